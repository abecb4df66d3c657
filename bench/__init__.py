"""The benchmark (scripts/bench): ours vs the Go reference plugins, cold and warm."""
