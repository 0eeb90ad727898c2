"""Multi-stage pipelines built from the library: the evaluation job, the demo, the
cached experiment steps shared by the demo and the benchmarks, and cost measurements."""
