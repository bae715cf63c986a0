"""Ray job entrypoints: `python -m jobs.<name> ...`, thin (parse, configure, call engine).

Each works submitted as a Ray job (`ray job submit -- python -m jobs.finetune ...`, which
sets RAY_ADDRESS) and run directly (a local Ray is started).
"""
