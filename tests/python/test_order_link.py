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


def link(tmp: Path, mangling: str, bin_name: str | None) -> Path:
    (tmp / "m.rs").write_text(SOURCE)
    (tmp / "order.txt").write_text("# a comment line\nm::gamma\nm::alpha\nno::such::function\n")
    env = dict(os.environ, PROXY_LINK_ORDER_FILE=str(tmp / "order.txt"))
    env.pop("CARGO_BIN_NAME", None)
    if bin_name:
        env["CARGO_BIN_NAME"] = bin_name
    out = tmp / "m"
    # Legacy mangling is rustc's default (naming it needs an unstable flag).
    scheme = ["-C", "symbol-mangling-version=v0"] if mangling == "v0" else []
    subprocess.run(["rustc", "-O", "--crate-name", "m", *scheme, "-C", f"linker={LINK}", "-o", str(out),
                    str(tmp / "m.rs")],
                   check=True, env=env, cwd=tmp, timeout=120)
    assert subprocess.run([str(out)], capture_output=True, text=True, timeout=10).stdout.strip().isdigit()
    return out


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
