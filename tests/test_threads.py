"""The demo's thread count: the cores not busy now, not the 1-minute load average."""
import io

from knowcat import demo


def _fake_stat(samples):
    it = iter(samples)

    def fake_open(path, *a, **k):
        assert path == "/proc/stat"
        total, idle = next(it)
        # user nice system idle iowait ...: idle split so that idle + iowait = idle
        return io.StringIO(f"cpu  {total - idle} 0 0 {idle} 0 0 0 0 0 0\n")
    return fake_open


def test_idle_cores_all_used_whatever_the_load_average(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(demo.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (1.9, 1.9, 1.9), raising=False)
    monkeypatch.setattr("builtins.open", _fake_stat([(1000, 900), (1200, 1100)]))  # 0% busy now
    assert demo.free_cores(window=0) == 2


def test_a_busy_core_is_left_alone(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(demo.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    monkeypatch.setattr("builtins.open", _fake_stat([(1000, 500), (1200, 600)]))  # half of 2 cores busy
    assert demo.free_cores(window=0) == 1
    monkeypatch.setattr("builtins.open", _fake_stat([(1000, 500), (1200, 500)]))  # both busy: still one
    assert demo.free_cores(window=0) == 1


def test_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert demo.free_cores(window=0) == 3
