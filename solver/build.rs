//! Generates the builder protocol's types and gRPC service from proto/builder.proto.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/builder.proto");
    tonic_build::configure().compile(&["proto/builder.proto"], &["proto"])?;
    Ok(())
}
