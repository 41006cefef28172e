"""The workflows over many studies: ``train``, ``evaluate``, ``audit`` and ``bench``.

Each computes a typed result that :mod:`medvit_explain.report` renders (the report never imports a
workflow back). Studies come from one place, :mod:`.studies` (one ``Study`` type, one manifest CSV
format, phantom folders); slice labels from :mod:`.labels`; the model's own scores (ROC AUC, accuracy,
MAE) from :mod:`.scores`. Nothing is imported here, so ``import medvit_explain.workflows.studies``
stays light.
"""
