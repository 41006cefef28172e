"""The top-level API names stay the functions, whatever submodules have been imported."""

import importlib


def test_public_names_are_functions_after_every_submodule_import():
    import medvit_explain as mx

    for module in ("pipeline", "prediction", "explainers", "model", "io", "registry", "volume"):
        importlib.import_module(f"medvit_explain.{module}")
    for name in (
        "explain",
        "predict",
        "explain_volume",
        "load_volume",
        "load_model",
        "list_methods",
        "upsample",
        "normalize_for_display",
        "write_volume",
        "save_checkpoint",
    ):
        assert callable(getattr(mx, name)) and not isinstance(getattr(mx, name), type(importlib)), name
    assert issubclass(mx.MedvitInputError, Exception) and mx.Volume.__name__ == "Volume"
    assert set(mx.__all__) >= {"explain", "predict", "explain_volume", "load_volume", "load_model"}
