//! Compiles the official `onnx.proto` (proto/onnx.proto, from github.com/onnx/onnx, Apache-2.0)
//! into prost messages for the ONNX export, with protox: a protobuf compiler written in Rust, so
//! a build needs no `protoc` binary.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let descriptors = protox::compile(["proto/onnx.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
