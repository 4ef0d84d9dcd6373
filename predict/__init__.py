"""`vitserve predict`: score a folder of images offline with an artifact's engine, exactly as the service would.

    folder.py   IMAGES_DIR → sorted relative paths (recursive), and their labels when class subfolders name them
    run.py      the service's Classifier core without its HTTP batcher: decode in a pool sized by the CPU budget,
                batches at the engine's fastest size, softmax at the manifest's temperature, top-k with labels
    output.py   rows → CSV or JSONL, flushed per batch; read back tolerating a half-written last line (--resume)
    summary.py  counts, errors by type and, for labelled folders, finetune's own metrics and report files
    cli.py      the command line and its exit codes (0 all scored, 1 some files failed, 2 bad usage)
"""
