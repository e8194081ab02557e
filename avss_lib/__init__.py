"""avss_lib — the library behind the AVSS / EAVSS study. This docstring is its index.

==========================  =======================  =================================================================
chapter (notebook)          wing                     reads -> writes (artifacts, all defined in ``core/artifacts.py``)
==========================  =======================  =================================================================
01 activation statistics    ``ranking.stage``        benchmarks -> ``ACTIVATION_STATS``, ``CALIBRATION``, ``PROVENANCE_01``
02 AVSS ranking             ``ranking``              01 -> ``AVSS_SCORES``, ``SELECTIONS``
03 pruning (claim A1)       ``pruning``              01, 02 -> ``METHOD_SCORES``, ``PRUNED_SETS``, ``RESULTS``, ``RETENTION``,
                                                     ``COMPARISON``, ``CURVE``, ``SPEED``, ``VERDICT_03`` ...
04 hallucination (E1)       ``hallucination``        02 -> ``ANSWERS``, ``QUESTION_SPLIT``, ``EXAMPLE_STATS``, ``EAVSS_LAYERS``, ``VERDICT_04``
05 mitigation (E2)          ``mitigation``           02, 04 -> ``TRAIN_EXAMPLES``, ``ARMS``, ``MITIGATION_PER_EXAMPLE``, ``ARM_METRICS``, ``VERDICT_05``
06 performance appendix     ``performance``          01 and every stage's ``_done.json`` -> ``OVERHEAD``, ``MEMORY``, ``SPEEDUP`` ...
the book                    ``book``                 every stage -> the claims chapter, the reproducibility appendix,
                                                     a run's committed record (``avss record``), a run over
                                                     several models (``model_runs``: a book part per model)
==========================  =======================  =================================================================

Each wing has a ``stage.py`` whose one function runs its chapter and returns a result object (tables, and the
values its prose glues); a notebook is its parameters, that call, and figures, tables and prose. ``core/`` is
shared by every wing: errors, io and ``artifacts``, ``data_root`` and ``benchmarks`` (loading), ``models`` and
``layers`` (discovery), ``layer_removal``, ``activation_stats`` (streamed statistics), ``harness``,
``perplexity`` and ``tasks`` (the evaluation harness), ``answer_matching``, ``metrics``, ``resampling`` (the paired
bootstrap), ``verdicts`` (claim verdicts as data), ``splits``, ``timing``, ``workers`` (independent jobs in worker
processes), ``formatting``. A wing imports ``core`` and earlier
wings only. ``testing/`` holds the tiny random models and the built-book browser check.
"""
