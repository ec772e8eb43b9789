"""Contract tests every component must pass, importable by a plugin's own CI.

`backbone_contract` holds the checks as plain functions (build a backbone, call a check);
`banned_calls` scans source files for what code under modules/ must not do. `test_backbones.py`
runs the checks over every backbone preset that `experiments.config.groups()` finds, vidlab's own
and those of installed plugins (entry-point group ``vidlab.configs``). See docs/plugins.md.
"""
