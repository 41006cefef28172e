"""napari plugin (npe2; manifest ``napari.yaml``): a CT / label-map / overlay reader and the explain widget.

Install with ``pip install "medvit-explain[napari]"`` next to a napari that has a Qt backend (e.g.
``pip install "napari[all]"``; the extra does not pin one, as napari's plugin template advises). Nothing
here is imported by the core package, and importing this package imports neither napari nor torch;
reading a file never imports torch; the widget imports it when it is opened (the method list) and runs.
"""
