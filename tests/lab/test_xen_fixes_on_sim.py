"""What the real-Xen lab needed from remusd and the receiver, tested on the simulator.

- ``Domain.populated_pfns()``: the simulator's domains have no holes.
- remusd's checkpoint buffer starts small and grows on demand (a PVH guest's
  p2m_size is ~1M PFNs for 128 MiB of RAM), and ``capture`` still copies right.
- The initial copy of a domain with holes (a wrapper around a real sim domain
  that, like Xen, lists only some PFNs as populated and refuses to map the
  rest) sends the holes as XTAB entries and never gathers them; the real
  receiver commits checkpoint 0 and leaves the holes untouched.
- The receiver populates backup PFNs that the stream fills and the backup lacks
  (``receiver.physmap``).
- ``--backup-rename`` (test/lab only): a primary and its backup on one host;
  the backup gets NAME+SUFFIX and a uuid5-derived UUID; a failover runs it; the
  fence on the primary's UUID still refuses a new session afterwards.
"""

from __future__ import annotations

import os
import time
import uuid as uuidlib
from typing import cast

import numpy as np
import pytest

from receiver.physmap import Physmap
from receiver.rename import backup_config, check_suffix, derived_uuid
from receiver.staging import Staging
from remusd.config import Target
from remusd.epoch import CheckpointBuffer, capture, encode
from remusd.initial_copy import initial_copy
from remusd.link import FileLink, NetLink, Refused
from tests.receiver.test_daemon_process import Receiver
from tests.simhost import SimHost, sim_dir
from xenbind import PAGE_SIZE
from xenbind.errors import ConfigError, DomainError
from xenbind.hypervisor import Domain
from xenbind.session import Hello, Options, new_session_id
from xenbind.stream import Decoder, PageBatch, Pages, StreamWriter
from xenbind.stream.format import TYPE_NOTAB, TYPE_XTAB
from xenbind.types import DomainConfig

pytestmark = pytest.mark.timeout(120)

PAGES = 1024  # 4 MiB domains
MARK = 0xA5  # what the primary's holes hold: must never reach the backup


@pytest.fixture(scope="module")
def host():
    h = SimHost(sim_dir("labfix-")).start()
    yield h
    h.cleanup()


_n = iter(range(1, 10_000))


def new_domain(host: SimHost, pages: int = PAGES, workload: str = "idle"):
    name = f"lf{next(_n)}-{os.getpid()}"
    return host.create(
        memory=pages * PAGE_SIZE, workload=workload, seed=3, name=name, uuid=str(uuidlib.uuid4())
    )


class HoleyDomain:
    """A real sim domain seen as Xen shows an HVM/PVH guest: only ``present``
    PFNs have memory; mapping any other PFN fails."""

    def __init__(self, dom, present: np.ndarray) -> None:
        self.dom = dom
        self.domid = dom.domid
        self.present = np.asarray(present, dtype=np.uint64)
        self._ok = np.zeros(dom.pages, dtype=bool)
        self._ok[self.present.astype(np.intp)] = True
        self.gathered: list[np.ndarray] = []

    def populated_pfns(self) -> np.ndarray:
        return self.present.copy()

    def gather(self, pfns, out) -> None:
        p = np.asarray(pfns, dtype=np.uint64)
        if not self._ok[p.astype(np.intp)].all():
            bad = p[~self._ok[p.astype(np.intp)]]
            raise DomainError(
                self.domid,
                "xenforeignmemory_map(gather)",
                f"first PFN {int(bad[0]):#x}: EINVAL (a hole)",
            )
        self.gathered.append(p.copy())
        self.dom.gather(p, out)

    def __getattr__(self, name):  # info, pause, log-dirty, context, output: the sim's
        return getattr(self.dom, name)


def test_sim_domain_populated_pfns_are_all_pfns(host):
    dom = new_domain(host, pages=256)
    try:
        got = dom.populated_pfns()
        assert got.dtype == np.uint64
        assert np.array_equal(got, np.arange(256, dtype=np.uint64))
    finally:
        dom.destroy()


def test_checkpoint_buffer_starts_small_and_grows_geometrically():
    cb = CheckpointBuffer(1_000_000, verify=False, initial=16)
    assert cb.rows == 16 and cb.grown == 0
    assert cb.view(10).shape == (10, PAGE_SIZE) and cb.rows == 16
    v = cb.view(20)
    assert v.shape == (20, PAGE_SIZE) and cb.rows == 32 and cb.grown == 1  # doubled
    cb.view(100)
    assert cb.rows == 100 and cb.grown == 2  # straight to what is needed
    small = CheckpointBuffer(50, verify=False, initial=16)
    small.view(20)
    assert small.rows == 32
    small.view(40)
    assert small.rows == 50  # doubling capped at the domain's size
    with pytest.raises(ValueError, match="51 pages"):
        small.view(51)
    # the default start is bounded, whatever p2m_size says (a 128 MiB PVH guest: ~1M PFNs)
    assert CheckpointBuffer(1_044_480, verify=False).rows <= 8192


def test_capture_grows_the_buffer_and_copies_every_page(host):
    dom = new_domain(host, pages=512)
    try:
        cb = CheckpointBuffer(dom.pages, verify=False, initial=8)
        dom.enable_logdirty()
        want = np.arange(0, 400, 3, dtype=np.uint64)
        cap = capture(dom, cb, extra=want)
        assert cb.grown >= 1 and cb.rows >= len(cap.pfns)
        assert set(want.tolist()) <= set(cap.pfns.tolist())
        dom.pause()
        try:
            now = np.empty((len(cap.pfns), PAGE_SIZE), dtype=np.uint8)
            dom.gather(cap.pfns, now)
        finally:
            dom.unpause()
        # idle workload: nothing changed the captured pages since
        assert np.array_equal(now, cap.pages)
        dom.disable_logdirty()
    finally:
        dom.destroy()


def _holey(host) -> tuple[HoleyDomain, np.ndarray, np.ndarray]:
    dom = new_domain(host)
    present = np.concatenate([np.arange(0, 300), np.arange(700, PAGES)]).astype(np.uint64)
    holes = np.arange(300, 700, dtype=np.uint64)
    dom.pause()
    dom.scatter(holes, np.full((len(holes), PAGE_SIZE), MARK, dtype=np.uint8))
    dom.unpause()
    return HoleyDomain(dom, present), present, holes


def _copy(hd: HoleyDomain, link, writer: StreamWriter):
    cb = CheckpointBuffer(PAGES, verify=False, initial=64)
    res = initial_copy(
        cast(Domain, hd),  # duck-typed: what initial_copy calls of a Domain
        link,
        writer,
        cb,
        rounds=2,
        threshold=1,
        stop=lambda: False,
    )
    link.send(encode(writer, res.final))
    return res


def test_initial_copy_sends_holes_as_xtab_and_never_gathers_them(host, tmp_path):
    hd, present, holes = _holey(host)
    try:
        path = str(tmp_path / "holey.stream")
        link = FileLink(path)
        link.open()
        _copy(hd, link, StreamWriter(PAGES, codec="none"))
        link.close()
        hd.disable_logdirty()
        gathered = np.concatenate(hd.gathered)
        assert not np.isin(gathered, holes).any()
        dec = Decoder(max_p2m_size=PAGES)
        with open(path, "rb") as f:
            events = dec.feed(f.read())
        dec.eof()
        xtab, data_pfns = [], []
        for ev in events:
            if isinstance(ev, PageBatch):
                xtab += ev.pfns[ev.types == TYPE_XTAB].tolist()
                assert set(ev.types.tolist()) <= {TYPE_NOTAB, TYPE_XTAB}
            elif isinstance(ev, Pages):
                data_pfns += ev.pfns.tolist()
                assert not (ev.data == MARK).all(axis=1).any()
        assert sorted(xtab) == holes.tolist()  # every hole once, as XTAB
        assert set(data_pfns) == set(present.tolist())  # every populated page carried
    finally:
        hd.dom.destroy()


def _hello(config: DomainConfig) -> Hello:
    return Hello(
        session_id=new_session_id(),
        options=Options(codec="seed", interval_ms=100, heartbeat_ms=100),
        domain=config,
        generation=time.time_ns(),
        software="test_lab_fixes",
    )


def _config(dom) -> DomainConfig:
    i = dom.info()
    return DomainConfig(name=i.name, uuid=i.uuid, pages=i.pages, vcpus=i.vcpus, extra=dict(i.extra))


def _netlink(port: int, hello: Hello) -> NetLink:
    return NetLink(Target("tcp", "127.0.0.1", port), hello, connect_timeout=10, io_timeout=10)


def test_holes_through_the_receiver(tmp_path):
    primary = SimHost(sim_dir("labfix-p-")).start()
    backup = SimHost(sim_dir("labfix-b-")).start()
    r = Receiver(backup.dir, str(tmp_path), "--on-unprotect", "keep")
    try:
        hd, present, holes = _holey(primary)
        hello = _hello(_config(hd.dom))
        link = _netlink(r.port, hello)
        link.open()
        writer = StreamWriter(PAGES, codec="seed")
        _copy(hd, link, writer)
        ack = link.wait_ack(0, time.monotonic() + 30)
        assert ack.index == 0
        hd.disable_logdirty()
        m = r.wait_log(r"initial copy committed \((\d+) pages")
        assert int(m.group(1)) >= len(present)  # pre-copy rounds may resend pages
        link.close()
        bdom = backup.lookup(hello.domain.name)
        got = np.empty((PAGES, PAGE_SIZE), dtype=np.uint8)
        bdom.gather(np.arange(PAGES, dtype=np.uint64), got)
        want = np.empty((PAGES, PAGE_SIZE), dtype=np.uint8)
        hd.dom.pause()
        hd.dom.gather(np.arange(PAGES, dtype=np.uint64), want)
        usable = present[present < PAGES - 3].astype(np.intp)  # the sim's magic pages aside
        assert np.array_equal(got[usable], want[usable])
        assert not (got[holes.astype(np.intp)] == MARK).all(axis=1).any()
        hd.dom.destroy()
    finally:
        assert r.stop() == 0, r.log()[-3000:]
        assert "Traceback" not in r.log(), r.log()[-3000:]
        primary.cleanup()
        backup.cleanup()


class _Backup:
    """A backup whose physmap lacks some PFNs: populate() fills them in."""

    domid = 7

    def __init__(self, pages: int, missing: np.ndarray) -> None:
        self.pages = pages
        self.backed = np.ones(pages, dtype=bool)
        self.backed[missing.astype(np.intp)] = False
        self.populate_calls: list[list[int]] = []
        self.mem = np.zeros((pages, PAGE_SIZE), dtype=np.uint8)

    def populated_pfns(self):
        return np.flatnonzero(self.backed).astype(np.uint64)

    def populate(self, pfns):
        self.populate_calls.append(np.asarray(pfns).tolist())
        self.backed[np.asarray(pfns, dtype=np.intp)] = True

    def scatter(self, pfns, pages):
        idx = np.asarray(pfns, dtype=np.intp)
        if not self.backed[idx].all():
            raise DomainError(self.domid, "scatter", "PFN without memory")
        self.mem[idx] = pages

    def set_context(self, ctx):
        self.ctx = ctx


def test_physmap_populates_only_missing_pfns_once():
    b = _Backup(64, np.array([5, 6, 40], dtype=np.uint64))
    pm = Physmap(b, 64)
    assert pm.initially_backed == 61
    assert pm.ensure(np.array([1, 2, 3], dtype=np.uint64)) == 0 and b.populate_calls == []
    assert pm.ensure(np.array([4, 5, 6, 7], dtype=np.uint64)) == 2
    assert b.populate_calls == [[5, 6]]
    assert pm.ensure(np.array([5, 6], dtype=np.uint64)) == 0  # remembered
    with pytest.raises(DomainError, match="past the last page"):
        pm.ensure(np.array([64], dtype=np.uint64))
    # the staging area's commit goes through it
    st = Staging(64, 1 << 20)
    st.add(np.array([39, 40], dtype=np.uint64), np.full((2, PAGE_SIZE), 7, dtype=np.uint8))
    assert st.commit(b, "ctx", pm) == 2
    assert b.populate_calls[-1] == [40] and (b.mem[40] == 7).all()


def test_backup_rename_identity():
    cfg = DomainConfig(
        name="guest",
        uuid="0f8fad5b-d9cb-469f-a165-70867728950e",
        pages=8,
        vcpus=1,
        extra={"type": "pvh"},
    )
    assert backup_config(cfg, None) is cfg
    b = backup_config(cfg, "-backup")
    assert b.name == "guest-backup" and b.uuid != cfg.uuid
    assert b.uuid == derived_uuid(cfg.uuid.upper(), "-backup")  # deterministic, case-blind
    assert uuidlib.UUID(b.uuid).version == 5
    assert (b.pages, b.vcpus, b.extra) == (cfg.pages, cfg.vcpus, cfg.extra)
    assert backup_config(cfg, "-b2").uuid != b.uuid
    for bad in ("", "a b", 'x"', "x" * 33, "a/b"):
        with pytest.raises(ConfigError):
            check_suffix(bad)
    with pytest.raises(ConfigError, match="longer than 64"):
        backup_config(DomainConfig(name="g" * 60, uuid=cfg.uuid, pages=8, vcpus=1), "-backup")


def test_backup_rename_on_one_host_fails_over_and_keeps_the_fence(host, tmp_path):
    dom = new_domain(host, workload="idle")
    cfg = _config(dom)
    os.makedirs(tmp_path / "plain")
    plain = Receiver(host.dir, str(tmp_path / "plain"), "--failover-timeout", "400")
    try:  # without the option: the running primary fences the session (by design)
        with pytest.raises(Refused) as e:
            _netlink(plain.port, _hello(cfg)).open()
        assert e.value.code == "fenced"
    finally:
        assert plain.stop() == 0
    os.makedirs(tmp_path / "rename")
    r = Receiver(
        host.dir, str(tmp_path / "rename"), "--failover-timeout", "400", "--backup-rename=-backup"
    )  # "=": the suffix starts with a dash
    try:
        hello = _hello(cfg)
        link = _netlink(r.port, hello)
        link.open()
        writer = StreamWriter(cfg.pages, codec="seed")
        cb = CheckpointBuffer(cfg.pages, verify=False)
        res = initial_copy(dom, link, writer, cb, rounds=1, threshold=1, stop=lambda: False)
        link.send(encode(writer, res.final))
        link.wait_ack(0, time.monotonic() + 30)
        dom.disable_logdirty()
        bname, buuid = cfg.name + "-backup", derived_uuid(cfg.uuid, "-backup")
        assert r.session(cfg.name)["uuid"] == cfg.uuid  # the receiver keys on the primary's
        link.close()  # the primary goes silent: failover after 400 ms
        r.wait_log(r"failed over|resumed", timeout=20)
        infos = {i.name: i for i in host.hv.list()}
        assert infos[bname].uuid == buuid and infos[bname].state == "running"
        assert infos[cfg.name].uuid == cfg.uuid  # the primary is untouched
        assert r.session(cfg.name)["state"] == "failed-over"
        # the fence on the primary's UUID holds: a new session is refused
        with pytest.raises(Refused) as e:
            _netlink(r.port, _hello(cfg)).open()
        assert e.value.code == "fenced"
        host.hv.lookup(bname).destroy()
    finally:
        assert r.stop() == 0, r.log()[-3000:]
        assert "Traceback" not in r.log(), r.log()[-3000:]
        dom.destroy()


# ------------------------------------------------------- the backup's xl config from the primary's

#: `xl list -l` of a PVH guest like the lab's (Xen 4.17's libxl JSON, abridged)
XL_LIST_L = """[
    {
        "domid": 1,
        "config": {
            "c_info": {"type": "pvh", "name": "labguest",
                       "uuid": "0f8fad5b-d9cb-469f-a165-70867728950e"},
            "b_info": {
                "max_vcpus": 1, "max_memkb": 132096, "target_memkb": 131072,
                "tsc_mode": "native",
                "cpuid": [
                    {"leaf": 2147483649,
                     "edx": "xxxx0xxxxxxxxxxxxxxxxxxxxxxxxxxx"},
                    {"leaf": 7, "subleaf": 0, "ebx": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0",
                     "ecx": "bogus"}
                ],
                "kernel": "/work/main/lab/cache/vmlinuz",
                "ramdisk": "/work/main/lab/cache/guest-initrd.gz",
                "cmdline": "console=hvc0 quiet",
                "type.pvh": {}
            }
        }
    }
]"""


def test_build_info_from_xl_json_and_the_backup_config():
    from xenbind.xl import build_info_from_json, xl_config

    extra = build_info_from_json(XL_LIST_L)
    assert extra == {
        "type": "pvh",
        "memory_mib": 128,
        "maxmem_mib": 129,
        "kernel": "/work/main/lab/cache/vmlinuz",
        "ramdisk": "/work/main/lab/cache/guest-initrd.gz",
        "cmdline": "console=hvc0 quiet",
        "tsc_mode": "native",
        "cpuid": [
            "0x80000001:edx=xxxx0xxxxxxxxxxxxxxxxxxxxxxxxxxx",
            "0x7,0x0:ebx=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0",
        ],
    }
    # p2m_size of the lab's 128 MiB PVH guest: the memory comes from extra, not from it
    text = xl_config(
        DomainConfig(
            name="labguest-backup",
            uuid=derived_uuid("0f8fad5b-d9cb-469f-a165-70867728950e", "-backup"),
            pages=1044480,
            vcpus=1,
            extra=extra,
        )
    )
    lines = dict(line.split(" = ", 1) for line in text.splitlines())
    assert lines["memory"] == "128" and lines["maxmem"] == "129"
    assert lines["type"] == '"pvh"' and lines["tsc_mode"] == '"native"'
    assert lines["kernel"] == '"/work/main/lab/cache/vmlinuz"'
    assert lines["cpuid"] == (
        '[ "0x80000001:edx=xxxx0xxxxxxxxxxxxxxxxxxxxxxxxxxx", '
        '"0x7,0x0:ebx=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0" ]'
    )


@pytest.mark.parametrize(
    "extra",
    [
        {"cpuid": ["0x1:eax=" + "x" * 31 + '"\nkernel="/evil']},
        {"cpuid": "host,rdtscp=0"},  # not a list
        {"memory_mib": "128"},
        {"memory_mib": 0},
        {"tsc_mode": 'native"\nx="'},
    ],
)
def test_backup_config_extras_are_checked(extra):
    from xenbind.xl import xl_config

    with pytest.raises(ConfigError):
        xl_config(DomainConfig(name="g", uuid="", pages=256, vcpus=1, extra=extra))
