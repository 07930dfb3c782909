"""The accelerator: a pull-through Registry V2 mirror (``dao mirror serve``)."""
