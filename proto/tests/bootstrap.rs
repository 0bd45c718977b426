//! Regenerates the committed code from the .proto files and fails if it changed: builds need no
//! protoc, and the generated code cannot drift from the contract. Run with
//! `BREAKWATER_BLESS=1` to write the new code in place.
use std::{fs, path::PathBuf};

#[test]
fn generated_code_is_up_to_date() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let proto_dir = root.join("proto");
    let fds = protox::compile(["breakwater/v1/agent.proto"], [&proto_dir]).expect("compile .proto");
    let out = tempfile::tempdir().expect("tempdir");
    breakwater_proto_codegen(out.path(), fds);

    let generated = fs::read_to_string(out.path().join("breakwater.v1.rs")).expect("generated");
    let committed_path = root.join("src/gen/breakwater.v1.rs");
    let committed = fs::read_to_string(&committed_path).unwrap_or_default();
    if generated != committed {
        if std::env::var_os("BREAKWATER_BLESS").is_some() {
            fs::create_dir_all(committed_path.parent().unwrap()).unwrap();
            fs::write(&committed_path, generated).unwrap();
            return;
        }
        panic!(
            "{} is out of date with the .proto files: run `BREAKWATER_BLESS=1 cargo test -p breakwater-proto --test bootstrap`",
            committed_path.display()
        );
    }
}

fn breakwater_proto_codegen(out: &std::path::Path, fds: prost_types::FileDescriptorSet) {
    let enum_fields = [
        ("breakwater.v1.Destination.direction", "direction"),
        ("breakwater.v1.Connection.direction", "direction"),
        ("breakwater.v1.TimeWaitDestination.direction", "direction"),
        ("breakwater.v1.PortPressure.level", "pressure_level"),
        ("breakwater.v1.Finding.severity", "severity"),
        ("breakwater.v1.Breaker.state", "breaker_state"),
        ("breakwater.v1.BreakerEvent.from", "breaker_state"),
        ("breakwater.v1.BreakerEvent.to", "breaker_state"),
        ("breakwater.v1.BreakerEvent.cause", "breaker_cause"),
        (
            "breakwater.v1.ListDestinationsRequest.direction",
            "direction",
        ),
        (
            "breakwater.v1.ListDestinationsRequest.sort",
            "destination_sort",
        ),
    ];
    let mut builder = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(out)
        // `-o json` prints responses with the proto's field names and enum value names.
        .type_attribute(".breakwater.v1", "#[derive(serde::Serialize)]");
    for (field, with) in enum_fields {
        builder = builder.field_attribute(
            field,
            format!("#[serde(serialize_with = \"crate::json::{with}\")]"),
        );
    }
    builder.compile_fds(fds).expect("generate code");
}
