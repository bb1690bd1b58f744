"""Measuring: scores against the toy world (scores.py), the benchmarks (bench.py), the GPU check
(bench_gpu.py, ``dream3d bench-gpu``) and what this machine can run (doctor.py, ``dream3d doctor``)."""
