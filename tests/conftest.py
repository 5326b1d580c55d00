"""Shared pytest fixtures: the real data in ../shared/data and real servers on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data (real imagery and STAC items); skips when absent (a bare clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (clone with ../shared beside it)")
    return SHARED_DATA


# ---------------------------------------------------------------------------------------------
# Real servers on 127.0.0.1 (helpers in tests/servers.py). Each is stopped at teardown, pass or fail.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server():
    """A real ``moto_server`` subprocess on 127.0.0.1 for the whole session.

    Yields an :class:`servers.S3Server` with ``.endpoint_url`` ("http://127.0.0.1:PORT"), ``.host_port``
    ("127.0.0.1:PORT"), ``.client`` (boto3), ``.make_bucket(name)``, ``.upload(path, bucket, key)`` and
    ``.upload_dir(dir, bucket, prefix)``. While active, ``os.environ`` holds dummy AWS keys,
    AWS_DEFAULT_REGION=us-east-1, AWS_S3_ENDPOINT, AWS_HTTPS=NO, AWS_VIRTUAL_HOSTING=FALSE,
    CPL_VSIL_USE_TEMP_FILE_FOR_RANDOM_WRITE=YES and AWS_ENDPOINT_URL, so GDAL ``/vsis3/``, boto3 and s3fs
    all reach it; the previous environment is restored afterwards.
    """
    from servers import S3Server, start_moto

    srv = S3Server(start_moto())
    try:
        with srv.activate():
            yield srv
    finally:
        srv.stop()


@pytest.fixture
def stac_api():
    """Factory for real STAC APIs (``rustac serve``, in memory) on 127.0.0.1, stopped after the test.

    ``url = stac_api(items, collections=None)`` serves the given item dicts (a minimal collection is
    generated per collection id when ``collections`` is None) and returns the API root URL
    ("http://127.0.0.1:PORT"). ``stac_api.servers`` lists the :class:`servers.Server` objects started.
    rustac supports bbox/datetime/collections/ids/intersects/paging; a ``query`` or ``filter`` makes it
    return NO items (see tests/servers.py), so filter on the client.
    """
    from servers import start_stac_api

    started = []

    def factory(items, collections=None) -> str:
        srv = start_stac_api(items, collections)
        started.append(srv)
        return srv.url

    factory.servers = started
    try:
        yield factory
    finally:
        for srv in started:
            srv.stop()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Refuse a run that collected fewer tests than CI expects: 'no tests' must never look like success."""
    import os

    minimum = int(os.environ.get("PIXELS_XR_MIN_TESTS", "0"))
    if minimum and len(session.items) < minimum and not session.config.option.collectonly:
        raise pytest.UsageError(f"only {len(session.items)} tests collected, CI expects at least {minimum}")


@pytest.fixture(scope="session")
def dask_scheduler(s3_server):
    """A real ``dask scheduler`` + 2 ``dask worker --no-nanny --nthreads 1 --memory-limit 2GiB`` processes.

    Yields a :class:`servers.DaskCluster`: ``.address`` ("tcp://127.0.0.1:PORT"), ``.kill_worker(i)``
    (SIGKILL worker i), ``.restart_worker(i)`` (start it again, wait until registered),
    ``.wait_for_workers()``, ``.workers`` / ``.scheduler`` (:class:`servers.Server`). Depends on
    ``s3_server`` so that the workers inherit the S3 environment (they can read ``/vsis3/`` and ``s3://``);
    tests/ and the repo are on the workers' PYTHONPATH. A test that kills a worker must restart it.
    """
    from servers import DaskCluster

    cluster = DaskCluster(n_workers=2, nthreads=1, memory_limit="2GiB")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def _dask_workers_outlive_each_test(request: pytest.FixtureRequest):
    """After a test on ``dask_scheduler``, bring back any worker that is gone, so that later tests meet
    the two workers they expect (the cluster is shared by the session, and a lost worker used to fail
    unrelated tests later with only "1 == 2", its log deleted with the cluster).

    A worker killed by a signal the test did not send (a crash: SIGSEGV, SIGABRT) fails the test it
    died in, with its log. One the scheduler dropped while its process lived on or exited by itself
    (a missed heartbeat on a loaded machine) is restarted with a warning that carries its log.
    """
    yield
    if "dask_scheduler" not in request.fixturenames:
        return
    import signal
    import warnings

    try:
        cluster = request.getfixturevalue("dask_scheduler")
    except Exception:  # its set-up failed: reported once, by the test
        return
    try:
        lost = cluster.lost_workers()
    except Exception as exc:  # the scheduler itself does not answer
        pytest.fail(f"the dask scheduler does not answer after this test: {exc}\n{cluster.logs()[-8000:]}",
                    pytrace=False)
    if not lost:
        return
    codes = {i: cluster.workers[i].proc.returncode if cluster.workers[i] and cluster.workers[i].proc else None
             for i in lost}
    report = "\n".join(f"--- w{i} (exit code {codes[i]}) ---\n{cluster.workers[i].log()[-6000:]}"
                       for i in lost if cluster.workers[i])
    report += f"\n--- scheduler ---\n{cluster.scheduler.log()[-3000:]}"
    try:
        for i in lost:
            cluster.restart_worker(i)
    except Exception as exc:
        pytest.fail(f"dask workers {lost} were lost during this test and could not be restarted: {exc}\n"
                    f"{report}", pytrace=False)
    crashed = [f"w{i}" for i, code in codes.items() if code is not None and code < 0 and -code != signal.SIGKILL]
    if crashed:
        pytest.fail(f"dask workers {crashed} crashed during this test\n{report}", pytrace=False)
    warnings.warn(f"dask workers {[f'w{i}' for i in lost]} were dropped during this test and restarted\n"
                  f"{report}", pytest.PytestWarning, stacklevel=1)


@pytest.fixture(scope="session")
def gateway_server(s3_server):
    """A real ``dask-gateway-server`` (UnsafeLocalBackend, SimpleAuthenticator) on 127.0.0.1 free ports.

    Yields a :class:`servers.GatewayServer`: ``.address`` ("http://127.0.0.1:P"), ``.proxy_address``
    ("gateway://127.0.0.1:Q"), ``.auth`` (``dask_gateway.BasicAuth``), ``.password``, ``.username`` and
    ``.gateway()`` (a connected ``dask_gateway.Gateway``). Clusters run ``<venv>/bin/dask scheduler|worker``
    with 1 core / 2 GiB workers (max 4) and inherit the S3 environment (hence the ``s3_server`` dependency).
    """
    from servers import start_gateway

    gw = start_gateway()
    try:
        yield gw
    finally:
        gw.stop()
