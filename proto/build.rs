//! Compiles the `.proto` files with protox (a protobuf compiler in Rust), so
//! building fleetpatch needs no system `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/fleetpatch/v1/bus.proto", "proto/fleetpatch/v1/agent.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
