"""Training one model: ``training.loop.train(config, out_dir)`` is the one training loop.

    rundir.py     the run directory: config.json, metrics.jsonl, summary.json (written last: finished)
    trainer.py    Trainer: the model, the optimizer, the compiled step and the evaluation (the plain path)
    speed/        the Linux-CPU speed layer: the same step and evaluation, faster, tested equal
    loop.py       train(): epochs of steps, evaluation, periodic hooks, the summary
"""
