"""Many containers at once from lazy images while the background fetch runs
(`python -m perf load`, run small): every container reads all its files, verified
against the generated data, in both waves; no errors, no hang."""

from perf.load import Sizes, report, run_load

SMALL = Sizes(images=2, containers=8, waves=2, files=40, cold_bytes=8 << 20,
              background_bytes_per_second=512 << 10)


def test_waves_of_containers_all_get_ready_with_no_errors(registry, tmp_path) -> None:
    data = run_load(SMALL, tmp_path, registry)
    assert all(pull["lazy"] for pull in data["pulls"]), data["pulls"]
    assert data["background_started_seconds"] is not None  # the waves began beside it
    for wave in data["waves"]:
        assert wave["ready"] == wave["containers"] == SMALL.containers, wave["failed"]
        assert wave["memory"]["total_rss_bytes"] > 0
        assert wave["open_fds"]["service"] > 0 and wave["open_fds"]["fuse_manager"] > 0
    # The first wave read through FUSE; the second finds most pages in the kernel's cache.
    assert data["waves"][0]["fuse_latency"]["read"]["count"] > 0
    assert data["total_errors"] == 0, (data["error_counters"], data["service_error_lines"])
    # The cold files were left to the background fetch, which ran during the waves
    # (it yields to containers' misses, so mostly during the second).
    assert sum(wave["background_bytes_during_wave"] for wave in data["waves"]) > 0
    assert "READY" in report(data)
