"""The evaluation: every registered method run over the same cases and scored by the same
metrics, one summary row each.

- :mod:`.runner` edits with a method and scores each case (:func:`~.runner.run_method`),
- :mod:`.summary` turns per-case metrics into summary rows with their protocol,
- :mod:`.outputs` writes the table (JSON, Markdown, chart) and the per-case records,
- :mod:`.compare` is the library entry point (``remedi.compare``) that the command uses too,
- :mod:`.config` reads the command's YAML config files and per-method sections,
- :mod:`.tasks`, :mod:`.probe`, :mod:`.mcrae`, :mod:`.biosbias` and :mod:`.settings` are REMEDI's
  own evaluations (Hernandez, Li, Andreas 2023): the Fact-Med / Fact-Prior probe, McRae
  entailment and Bias in Bios generation (``--task probe|mcrae|biosbias``).

``python -m remedi.evaluate`` (:mod:`remedi.evaluate`) is a thin command on top of these.
"""
