"""Kernel generation core: typed configs -> Jinja2 templates -> NVRTC cubins -> launches."""
