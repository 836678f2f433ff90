//! Compiles `proto/*.proto` with protox (pure Rust): no system `protoc` needed.
fn main() {
    let files = ["proto/image.proto", "proto/migrate.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"]).expect("compile .proto files");
    prost_build::Config::new()
        .compile_fds(fds)
        .expect("generate prost types");
}
