//! Local-disk storage: the kernel's `Storage` contract on a real directory.

use sabot::fs_storage::LocalFsStorage;
use sabot_kernel::env::{write_atomic, Storage, StorageError};

// Goal: files round-trip, names list sorted (files only), renames replace, deletes delete.
#[test]
fn files_round_trip_list_rename_delete() {
    let dir = tempfile::tempdir().unwrap();
    let mut storage = LocalFsStorage::open(dir.path()).unwrap();
    storage.write("a/b/second", b"2").unwrap();
    storage.write("a/b/first", b"1").unwrap();
    storage.write("a/b/c/nested", b"n").unwrap();
    storage.sync_file("a/b/first").unwrap();
    storage.sync_dir("a/b").unwrap();
    storage.sync_dir("").unwrap();
    assert_eq!(storage.list("a/b").unwrap(), vec!["first", "second"]);
    assert_eq!(storage.list("nowhere").unwrap(), Vec::<String>::new());
    storage.rename("a/b/second", "a/b/first").unwrap();
    assert_eq!(storage.read("a/b/first").unwrap(), b"2");
    assert_eq!(storage.list("a/b").unwrap(), vec!["first"]);
    write_atomic(&mut storage, "x/pointer", b"latest").unwrap();
    assert_eq!(storage.read("x/pointer").unwrap(), b"latest");
    assert_eq!(storage.list("x").unwrap(), vec!["pointer"]);
    storage.delete("x/pointer").unwrap();
    assert_eq!(storage.read("x/pointer"), Err(StorageError::NotFound { path: "x/pointer".into() }));
}

// Goal: errors name the path and kind: a missing file, an escaping path, a file where a directory
// should be.
#[test]
fn errors_name_path_and_kind() {
    let dir = tempfile::tempdir().unwrap();
    let mut storage = LocalFsStorage::open(dir.path()).unwrap();
    assert_eq!(storage.sync_file("missing"), Err(StorageError::NotFound { path: "missing".into() }));
    assert!(matches!(storage.write("../escape", b""), Err(StorageError::InvalidPath { .. })));
    assert!(matches!(storage.read("/etc/passwd"), Err(StorageError::InvalidPath { .. })));
    storage.write("file", b"").unwrap();
    match storage.write("file/child", b"") {
        Err(StorageError::Io { path, .. }) => assert_eq!(path, "file/child"),
        other => panic!("expected an i/o error naming the path, got {other:?}"),
    }
}
