//! Builds the restorer blob (`restorer/src/main.rs`) with the same `rustc`
//! that builds this crate: a `#![no_std]` static-pie with no libc, for the host
//! target (no extra rustup target needed). The ELF is then flattened here into
//! a memory image plus its entry offset and `R_X86_64_RELATIVE` relocations,
//! written to `$OUT_DIR/restorer_blob.rs` for `include!`.
use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let src = PathBuf::from("restorer/src/main.rs");
    println!("cargo:rerun-if-changed=restorer/src/main.rs");
    println!("cargo:rerun-if-changed=restorer/src/abi.rs");
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let elf_path = out.join("restorer.elf");
    let status = Command::new(&rustc)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            "restorer",
        ])
        .args([
            "-C",
            "panic=abort",
            "-C",
            "relocation-model=pie",
            "-C",
            "opt-level=2",
        ])
        .args(["-C", "debuginfo=0", "-C", "codegen-units=1"])
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
        .args([
            "-C",
            "link-arg=-static-pie",
            "-C",
            "link-arg=-Wl,--no-dynamic-linker",
        ])
        .args([
            "-C",
            "link-arg=-Wl,--build-id=none",
            "-C",
            "link-arg=-Wl,-e,_start",
        ])
        .arg("-o")
        .arg(&elf_path)
        .arg(&src)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("run rustc for the restorer blob");
    assert!(status.success(), "building the restorer blob failed");

    let elf = fs::read(&elf_path).unwrap();
    let flat = flatten(&elf);
    fs::write(out.join("restorer.bin"), &flat.image).unwrap();
    let mut rs = String::new();
    rs.push_str(&format!("pub const ENTRY: usize = {};\n", flat.entry));
    rs.push_str("pub const RELOCS: &[(usize, u64)] = &[\n");
    for (off, add) in &flat.relocs {
        rs.push_str(&format!("    ({off}, {add}),\n"));
    }
    rs.push_str("];\n");
    rs.push_str("pub static IMAGE: &[u8] = include_bytes!(concat!(env!(\"OUT_DIR\"), \"/restorer.bin\"));\n");
    fs::write(out.join("restorer_blob.rs"), rs).unwrap();
}

struct Flat {
    image: Vec<u8>,
    entry: u64,
    relocs: Vec<(u64, u64)>,
}

fn u16le(b: &[u8], o: usize) -> u64 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap()) as u64
}
fn u32le(b: &[u8], o: usize) -> u64 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as u64
}
fn u64le(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Lays the PT_LOAD segments out as they would be in memory at base 0 and
/// collects the dynamic relocations (only RELATIVE ones are allowed).
fn flatten(elf: &[u8]) -> Flat {
    assert_eq!(&elf[..4], b"\x7fELF", "restorer is not an ELF file");
    let entry = u64le(elf, 24);
    let phoff = u64le(elf, 32) as usize;
    let phentsize = u16le(elf, 54) as usize;
    let phnum = u16le(elf, 56) as usize;
    let mut image = Vec::new();
    let mut dynamic = None;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let ptype = u32le(elf, ph);
        let off = u64le(elf, ph + 8) as usize;
        let vaddr = u64le(elf, ph + 16) as usize;
        let filesz = u64le(elf, ph + 32) as usize;
        let memsz = u64le(elf, ph + 40) as usize;
        match ptype {
            1 => {
                if image.len() < vaddr + memsz {
                    image.resize(vaddr + memsz, 0);
                }
                image[vaddr..vaddr + filesz].copy_from_slice(&elf[off..off + filesz]);
            }
            2 => dynamic = Some((off, filesz)),
            _ => {}
        }
    }
    image.resize(image.len().div_ceil(4096) * 4096, 0);
    let mut relocs = Vec::new();
    if let Some((off, size)) = dynamic {
        let (mut rela, mut relasz) = (0usize, 0usize);
        for d in (off..off + size).step_by(16) {
            match u64le(elf, d) {
                7 => rela = u64le(elf, d + 8) as usize,
                8 => relasz = u64le(elf, d + 8) as usize,
                _ => {}
            }
        }
        // DT_RELA is a virtual address; read it from the flat image.
        for r in (rela..rela + relasz).step_by(24) {
            let offset = u64le(&image, r);
            let info = u64le(&image, r + 8);
            let addend = u64le(&image, r + 16);
            assert_eq!(
                info & 0xffff_ffff,
                8,
                "restorer has a non-RELATIVE relocation"
            );
            relocs.push((offset, addend));
        }
    }
    Flat {
        image,
        entry,
        relocs,
    }
}
