//! Replays every input under `fuzz/corpus/<target>/` (seeds, and each input a fuzzer ever
//! crashed on, kept there once fixed) through the same entry points the fuzz targets call, on
//! stable and on a runtime-sized stack, so CI keeps what fuzzing found.

use std::path::Path;

#[test]
fn every_committed_fuzz_input_runs_cleanly() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut replayed = 0;
    for (target, run) in stepflow::fuzzing::TARGETS {
        let dir = corpus.join(target);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (every target keeps a corpus)", dir.display()));
        let mut inputs = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let name = path.display().to_string();
            // Tokio's worker threads have 2 MiB: an input must not need more.
            std::thread::Builder::new()
                .name(name.clone())
                .stack_size(2 << 20)
                .spawn(move || run(&data))
                .unwrap()
                .join()
                .unwrap_or_else(|_| panic!("{name} panicked"));
            inputs += 1;
        }
        assert!(inputs > 0, "{} is empty", dir.display());
        replayed += inputs;
    }
    println!("fuzz corpus: {replayed} inputs replayed");
}
