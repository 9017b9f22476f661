//! The proxy's release link on x86_64 Linux reads `link-order.txt` through `scripts/order-link`
//! (the linker named in `.cargo/config.toml`). Cargo does not see either as an input, so without
//! this a new list would leave an up-to-date binary in its old layout.

fn main() {
    println!("cargo::rerun-if-changed=link-order.txt");
    println!("cargo::rerun-if-changed=../scripts/order-link");
    println!("cargo::rerun-if-changed=../.cargo/config.toml");
}
