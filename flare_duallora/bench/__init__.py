"""Benchmarks: which method, at what cost (accuracy, communication, training speed)."""

#: per benchmark: the settings it has (the CLI offers only these) and its default
SETTINGS = {
    "accuracy": (["tiny", "medium", "full"], "medium"),
    "comm": (["tiny", "full"], "full"),
    "speed": (["tiny", "small", "medium", "full"], "small"),
}
