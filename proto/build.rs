//! Compiles our own .proto files (Istio CA, workload, TypedStruct, IPMatcher, stats config) to Rust
//! with prost/tonic, and builds one descriptor set (ours + the Envoy API that `envoy-types` ships)
//! for the proto3-JSON reader and writer in `src/json.rs`. No system `protoc`: `protox` parses the
//! .proto files in-process.
//!
//! The Envoy .proto sources are found through `cargo metadata` (the documented way to learn where a
//! dependency's sources live) rather than by guessing registry paths; `ENVOY_TYPES_PROTO_DIR`
//! overrides it for unusual build setups.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// Our .proto files, relative to `protos/`.
const OWN_PROTOS: &[&str] = &[
    "istio/ca/ca.proto",
    "istio/workload/workload.proto",
    "istio/stats/config.proto",
    "udpa/type/v1/typed_struct.proto",
    "xds/type/v3/typed_struct.proto",
    "xds/type/matcher/v3/ip.proto",
];

/// Folders (under data-plane-api/envoy) whose v3 protos go into the JSON descriptor pool.
const ENVOY_TREES: &[&str] = &[
    "config",
    "admin",
    "service/discovery",
    "service/secret",
    "type",
    "extensions/access_loggers",
    "extensions/bootstrap",
    "extensions/compression",
    "extensions/filters",
    "extensions/formatter",
    "extensions/http",
    "extensions/load_balancing_policies",
    "extensions/matching",
    "extensions/network",
    "extensions/path",
    "extensions/request_id",
    "extensions/resource_monitors",
    "extensions/retry",
    "extensions/transport_sockets",
    "extensions/upstreams",
];

/// Include folders inside envoy-types' `proto/`.
const ENVOY_INCLUDES: &[&str] = &[
    "data-plane-api",
    "xds",
    "googleapis",
    "protoc-gen-validate",
    "cel-spec",
    "opentelemetry-proto",
    "client_model",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=protos");
    println!("cargo:rerun-if-env-changed=ENVOY_TYPES_PROTO_DIR");
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let own = manifest_dir.join("protos");
    let envoy = envoy_proto_dir(&manifest_dir)?;

    let mut includes = vec![own.clone()];
    includes.extend(ENVOY_INCLUDES.iter().map(|d| envoy.join(d)));

    // 1. Rust code for our own files (imports resolve to envoy-types' generated modules).
    let mut own_compiler = protox::Compiler::new(&includes)?;
    own_compiler.include_imports(true);
    own_compiler.open_files(OWN_PROTOS)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::envoy_types::pb::google::protobuf")
        .extern_path(".envoy", "::envoy_types::pb::envoy")
        .extern_path(".xds.core", "::envoy_types::pb::xds::core")
        .extern_path(
            ".xds.type.matcher.v3.Matcher",
            "crate::xds_matcher_v3::Matcher",
        )
        .compile_fds(own_compiler.file_descriptor_set())?;

    // 2. The descriptor pool for proto3-JSON: our files plus the Envoy API trees.
    let mut roots: Vec<PathBuf> = OWN_PROTOS.iter().map(PathBuf::from).collect();
    let api = envoy.join("data-plane-api");
    for tree in ENVOY_TREES {
        collect_v3_protos(&api.join("envoy").join(tree), &api, &mut roots)?;
    }
    roots.sort();
    std::fs::write(
        out_dir.join("descriptors.bin"),
        pool_descriptors(&includes, &roots)?,
    )?;
    Ok(())
}

/// Compiles `roots` into one encoded FileDescriptorSet (imports included, topologically ordered).
///
/// Compiled all together, a few Envoy files fail name resolution (a relative name such as
/// `common.aws.v3.X` binds to a sibling package loaded by another root first, which protoc never sees
/// when it compiles files one by one). Those roots are compiled again on their own and merged in.
fn pool_descriptors(
    includes: &[PathBuf],
    roots: &[PathBuf],
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let mut main = protox::Compiler::new(includes)?;
    main.include_imports(true);
    let mut retry = Vec::new();
    for root in roots {
        if main.open_file(root).is_err() {
            retry.push(root);
        }
    }
    let mut set = main.file_descriptor_set();
    let mut seen: std::collections::HashSet<String> =
        set.file.iter().map(|f| f.name().to_owned()).collect();
    for root in retry {
        let mut alone = protox::Compiler::new(includes)?;
        alone.include_imports(true);
        if let Err(err) = alone.open_file(root) {
            println!("cargo:warning=skipping {}: {err}", root.display());
            continue;
        }
        for file in alone.file_descriptor_set().file {
            if seen.insert(file.name().to_owned()) {
                set.file.push(file);
            }
        }
    }
    Ok(prost::Message::encode_to_vec(&set))
}

/// Every `*.proto` below `dir` whose path has a `v3` component, relative to `base`.
fn collect_v3_protos(dir: &Path, base: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_v3_protos(&path, base, out)?;
        } else if path.extension().is_some_and(|e| e == "proto")
            && path.components().any(|c| c.as_os_str() == "v3")
            && let Ok(rel) = path.strip_prefix(base)
        {
            out.push(rel.to_path_buf());
        }
    }
    Ok(())
}

/// The `proto/` folder shipped inside the resolved `envoy-types` package.
fn envoy_proto_dir(manifest_dir: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    if let Ok(dir) = env::var("ENVOY_TYPES_PROTO_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(cargo);
    cmd.args(["metadata", "--format-version", "1", "--offline"]);
    // Offline, a resolve over every platform needs packages a build never downloads (a
    // Windows-only dependency of a dependency): ask only about the platform being built.
    if let Ok(target) = env::var("TARGET") {
        cmd.args(["--filter-platform", &target]);
    }
    let output = cmd
        .arg("--manifest-path")
        .arg(manifest_dir.join("Cargo.toml"))
        .output()?;
    if !output.status.success() {
        // Offline, `cargo metadata` needs every package of the workspace, dev-dependencies
        // included, which a first `cargo build --bins` on a fresh machine has not downloaded.
        // The package the build itself uses is then in the registry's sources already.
        if let Some(dir) = registry_proto_dir(manifest_dir) {
            println!("cargo:rerun-if-changed={}", dir.display());
            return Ok(dir);
        }
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let meta: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let packages = meta["packages"]
        .as_array()
        .ok_or("cargo metadata: no packages")?;
    let pkg = packages
        .iter()
        .find(|p| p["name"] == "envoy-types")
        .ok_or("cargo metadata: envoy-types not found")?;
    let manifest = pkg["manifest_path"]
        .as_str()
        .ok_or("cargo metadata: no manifest_path")?;
    let dir = Path::new(manifest)
        .parent()
        .ok_or("cargo metadata: bad manifest_path")?
        .join("proto");
    println!("cargo:rerun-if-changed={}", dir.display());
    Ok(dir)
}

/// The `proto/` folder of the `envoy-types` version that the workspace's `Cargo.lock` pins, in the
/// cargo registry's unpacked sources (`$CARGO_HOME/registry/src/<index>/envoy-types-<version>`).
fn registry_proto_dir(manifest_dir: &Path) -> Option<PathBuf> {
    let lock = std::fs::read_to_string(manifest_dir.parent()?.join("Cargo.lock")).ok()?;
    let mut lines = lock.lines();
    let version = loop {
        if lines.next()?.trim() == "name = \"envoy-types\"" {
            let v = lines.next()?.trim().strip_prefix("version = \"")?;
            break v.strip_suffix('"')?.to_owned();
        }
    };
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    std::fs::read_dir(home.join("registry").join("src"))
        .ok()?
        .filter_map(Result::ok)
        .map(|index| {
            index
                .path()
                .join(format!("envoy-types-{version}"))
                .join("proto")
        })
        .find(|dir| dir.is_dir())
}
