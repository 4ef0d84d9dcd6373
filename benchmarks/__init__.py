"""Benchmarks, reachable as `vitserve bench <command>` (benchmarks/cli.py):

    engines   engine_sweep.py   every engine on this machine × batch sizes (on a GPU: fraction of its matmul rate)
    load      service_load.py   closed- and open-loop load on a running service, with its stage histograms
    compare   compare/          our service vs the raw engine and two BentoML peers (peers/), same run: run → judge → render
    flops     cli.py            FLOPs per image of a ViT config (models.py)

Every benchmark, the GPU check and the tests build on one harness (benchmarks/harness/): servers.py starts and
always stops a service; load.py offers closed/open-loop load over HTTP or gRPC; prometheus.py reads /metrics into
per-stage means; measure.py times calls and accounts CPU; sweep.py times an engine across batch sizes against the
device's matmul rate; results.py records the machine and writes the results, which land in
benchmarks/results/<name>_<environment>.{json,md[,png]}.
"""
