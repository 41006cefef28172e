"""napari plugin (npe2; manifest ``napari.yaml``): a CT / overlay reader and the explain widget.

Install with ``pip install "medvit-explain[napari]"``. Nothing here is imported by the core package,
and importing this package imports neither napari nor torch; the widget loads torch only when it runs.
"""
