//! Regenerates the committed code from the .proto files and fails if it changed: builds need no
//! protoc, and the generated code cannot drift from the contract. Run with
//! `BREAKWATER_BLESS=1` to write the new code in place.
use std::{fs, path::PathBuf};

#[test]
fn generated_code_is_up_to_date() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let proto_dir = root.join("proto");
    let fds = protox::compile(["breakwater/v1/agent.proto"], [&proto_dir]).expect("compile .proto");
    // The descriptor set (imports and comments included) is what server reflection serves.
    let descriptor_set = prost::Message::encode_to_vec(&fds);
    let out = tempfile::tempdir().expect("tempdir");
    breakwater_proto_codegen(out.path(), fds);
    let code = fs::read(out.path().join("breakwater.v1.rs")).expect("generated");

    let mut stale = Vec::new();
    for (name, generated) in [
        ("breakwater.v1.rs", code),
        ("file_descriptor_set.bin", descriptor_set),
    ] {
        let committed_path = root.join("src/gen").join(name);
        if fs::read(&committed_path).ok().as_ref() == Some(&generated) {
            continue;
        }
        if std::env::var_os("BREAKWATER_BLESS").is_some() {
            fs::create_dir_all(committed_path.parent().unwrap()).unwrap();
            fs::write(&committed_path, generated).unwrap();
        } else {
            stale.push(committed_path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "{} out of date with the .proto files: run `BREAKWATER_BLESS=1 cargo test -p breakwater-proto --test bootstrap`",
        stale.join(" and ")
    );
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
            "breakwater.v1.ConnectionEvent.kind",
            "connection_event_kind",
        ),
        ("breakwater.v1.ConnectionEvent.direction", "direction"),
        ("breakwater.v1.Feature.status", "feature_status"),
        ("breakwater.v1.Service.owner", "owner"),
        ("breakwater.v1.Service.shadowed", "owner"),
        ("breakwater.v1.Breaker.policy_owner", "owner"),
        ("breakwater.v1.Breaker.tripped_by", "owner"),
        ("breakwater.v1.DestinationBreaker.state", "breaker_state"),
        ("breakwater.v1.DestinationBreaker.tripped_by", "owner"),
        ("breakwater.v1.BreakerPolicy.granularity", "granularity"),
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
