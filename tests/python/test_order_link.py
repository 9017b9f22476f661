"""scripts/order-link, the linker the proxy's release build goes through on x86_64 Linux: a real
rustc links a small program through it, with a list naming two of its functions."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINK = REPO / "scripts" / "order-link"

SOURCE = """
#[inline(never)] pub fn alpha(x: u64) -> u64 { x.wrapping_mul(3).rotate_left(5) ^ 0xa1 }
#[inline(never)] pub fn beta(x: u64) -> u64 { x.wrapping_mul(7).rotate_left(9) ^ 0xb2 }
#[inline(never)] pub fn gamma(x: u64) -> u64 { x.wrapping_mul(11).rotate_left(13) ^ 0xc3 }
fn main() {
    let n = std::env::args().count() as u64;
    println!("{}", alpha(n).wrapping_add(beta(n)).wrapping_add(gamma(n)));
}
"""

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64" or not shutil.which("rustc")
    or not shutil.which("nm") or not shutil.which("c++filt"),
    reason="order-link is the linker of x86_64 Linux builds (needs rustc, nm, c++filt)")


def link(tmp: Path, mangling: str, bin_name: str | None, *extra: str, env: dict[str, str] | None = None,
         check: bool = True) -> Path:
    (tmp / "m.rs").write_text(SOURCE)
    (tmp / "order.txt").write_text("# a comment line\nm::gamma\nm::alpha\nno::such::function\n")
    full_env = dict(os.environ, PROXY_LINK_ORDER_FILE=str(tmp / "order.txt"), **(env or {}))
    for name in ("CARGO_BIN_NAME", "PROXY_LINK_ORDER", "PROXY_LINK_RELR"):
        full_env.pop(name, None)
    if bin_name:
        full_env["CARGO_BIN_NAME"] = bin_name
    out = tmp / "m"
    # Legacy mangling is rustc's default (naming it needs an unstable flag).
    scheme = ["-C", "symbol-mangling-version=v0"] if mangling == "v0" else []
    args = [f"-Clink-arg={a}" for a in extra]
    subprocess.run(["rustc", "-O", "--crate-name", "m", *scheme, *args, "-C", f"linker={LINK}", "-o", str(out),
                    str(tmp / "m.rs")], check=check, env=full_env, cwd=tmp, timeout=120)
    if not check:
        return out
    assert subprocess.run([str(out)], capture_output=True, text=True, timeout=10).stdout.strip().isdigit()
    if "-fuse-ld=bfd" not in extra and not linked_by_lld(out):
        pytest.skip("this rustc does not link with LLD by default; order-link leaves such links alone")
    return out


def linked_by_lld(binary: Path) -> bool:
    comment = subprocess.run(["readelf", "-p", ".comment", str(binary)], capture_output=True, text=True).stdout
    return "LLD" in comment


def addresses(binary: Path) -> dict[str, int]:
    syms = subprocess.run(["nm", "--defined-only", "-C", str(binary)], capture_output=True, text=True,
                          check=True).stdout
    found = {}
    for line in syms.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) == 3:
            name = re.sub(r"\[[0-9a-f]+\]|::h[0-9a-f]{16}$", "", parts[2])
            if name in ("m::alpha", "m::beta", "m::gamma"):
                found[name] = int(parts[0], 16)
    return found


@pytest.mark.parametrize("mangling", ["v0", "legacy"])
def test_listed_functions_come_first_in_list_order(tmp_path: Path, mangling: str) -> None:
    out = link(tmp_path, mangling, "proxy")
    at = addresses(out)
    assert set(at) == {"m::alpha", "m::beta", "m::gamma"}, at
    # Listed functions lead the text in the list's order; beta, not listed, comes after both.
    assert at["m::gamma"] < at["m::alpha"] < at["m::beta"], at
    stats = (tmp_path / "m.link-order").read_text()
    assert stats.startswith("listed 3, matched 2, symbols 2"), stats


def test_relative_relocations_packed_where_glibc_reads_them(tmp_path: Path) -> None:
    out = link(tmp_path, "v0", "proxy")
    dynamic = subprocess.run(["readelf", "-d", str(out)], capture_output=True, text=True, check=True).stdout
    version = subprocess.run(["getconf", "GNU_LIBC_VERSION"], capture_output=True, text=True).stdout.split()
    major, minor = (int(x) for x in version[1].split(".")[:2]) if len(version) == 2 else (0, 0)
    assert ("(RELR)" in dynamic) == ((major, minor) >= (2, 36)), dynamic


def test_other_binaries_link_as_usual(tmp_path: Path) -> None:
    out = link(tmp_path, "v0", "agent")
    assert not (tmp_path / "m.link-order").exists()
    dynamic = subprocess.run(["readelf", "-d", str(out)], capture_output=True, text=True, check=True).stdout
    assert "(RELR)" not in dynamic


def test_a_linker_named_after_rustcs_is_left_alone(tmp_path: Path) -> None:
    if not shutil.which("ld.bfd"):
        pytest.skip("no GNU ld")
    # -C link-arg comes after rustc's -fuse-ld=lld, so GNU ld links: it knows no ordering file.
    out = link(tmp_path, "v0", "proxy", "-fuse-ld=bfd")
    assert not linked_by_lld(out)
    assert not (tmp_path / "m.link-order").exists()


def test_a_comma_in_the_temporary_directory(tmp_path: Path) -> None:
    odd = tmp_path / "a,b"
    odd.mkdir()
    out = link(tmp_path, "v0", "proxy", env={"TMPDIR": str(odd)})
    at = addresses(out)
    assert at["m::gamma"] < at["m::alpha"] < at["m::beta"], at


def test_a_failed_link_fails(tmp_path: Path) -> None:
    out = link(tmp_path, "v0", "proxy", "-lno_such_library_anywhere", check=False)
    assert not out.exists()
    # It failed on the ordering path (which writes its counts), and rustc saw the failure.
    assert (tmp_path / "m.link-order").read_text().startswith("listed 3, matched 2")
