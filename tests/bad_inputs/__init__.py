"""A corpus of bad inputs, bad output locations and hostile files, generated in the test session.

Each module builds small files for one area (``images``: image files and DICOM; ``outputs``: output
locations and write failures; ``batch``: manifests and output folders; ``models``: model arguments) and
runs them through the real CLI with :func:`harness.run_cli`, asserting the contract of
:func:`harness.assert_refused`: the documented exit code, exactly one ``error:`` line, no traceback,
nothing at the final output paths.
"""
