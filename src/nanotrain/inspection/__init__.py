"""Model inspection: what a model and a layout cost before they run (`nanotrain inspect`)."""
