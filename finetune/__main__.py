"""`python -m finetune ...` is `vitserve finetune ...`."""

from finetune.cli import main

raise SystemExit(main())
