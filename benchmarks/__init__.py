"""Benchmarks, reachable as `vitserve bench <command>` (benchmarks/cli.py):

    engines   engine_sweep.py   every engine on this machine × batch sizes (on a GPU: fraction of its matmul rate)
    load      service_load.py   closed- and open-loop load on a running service, with its stage histograms
    compare   compare/          our service vs the raw engine and two BentoML peers (peers/), same run: run → judge → render
    flops     cli.py            FLOPs per image of a ViT config (models.py)

Results land in benchmarks/results/<name>_<environment>.{json,md[,png]} (common.write_result).
"""
