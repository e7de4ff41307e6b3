"""Shared benchmark plumbing: after a run, print every benchmark's throughput figures
(``benchmark.extra_info``) as one table, the numbers the README's tables quote."""

import os
import platform

import pytest


def machine_description() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


_RESULTS: list[tuple[str, dict]] = []


@pytest.fixture
def record(benchmark, request):
    """``record(key=value, ...)`` stores figures in the benchmark's extra_info and the summary."""

    def _record(**figures):
        benchmark.extra_info.update(figures)
        _RESULTS.append((request.node.name, dict(figures)))

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    terminalreporter.section(f"jetfast throughput ({machine_description()})")
    for name, figures in _RESULTS:
        text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
        terminalreporter.write_line(f"{name}: {text}")
