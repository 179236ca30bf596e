//! Prefetch order for the converter: a layer tar rewritten with the files a workload reads
//! first (in that order) at its front, so their frames are contiguous at the start of the blob.
//! Entries are moved whole (with their PAX/GNU records); a hard link brings its target along;
//! nothing moves ahead of an opaque marker of one of its directories; a layer with a PAX global
//! header is left as it is.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};

use super::toc::clean;
use super::ChunkedError;

struct Record {
    name: String,
    link: Option<String>,
    start: u64,
    end: u64,
}

/// What a reordering moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// Entries now at the front (0: the tar was copied as it is).
    pub entries: usize,
    /// The bytes of tar they take.
    pub bytes: u64,
}

/// Copies the tar in `input` to `output` with the entries named in `order` first.
pub fn reorder<R: Read + Seek>(
    mut input: R,
    output: &mut impl Write,
    order: &[String],
) -> Result<Moved, ChunkedError> {
    let io = |what: &'static str| ChunkedError::io(what);
    let mut records = Vec::new();
    let mut opaque_dirs: HashSet<String> = HashSet::new();
    let mut global = false;
    let trailer_start;
    input
        .seek(SeekFrom::Start(0))
        .map_err(io("seek the layer tar"))?;
    {
        let mut archive = tar::Archive::new(&mut input);
        let mut prev_end = 0u64;
        for entry in archive.entries().map_err(io("read the layer tar"))? {
            let entry = entry.map_err(io("read the layer tar"))?;
            let kind = entry.header().entry_type();
            if kind.is_pax_global_extensions() {
                global = true;
            }
            let name = clean(&entry.path().map_err(io("entry name"))?.to_string_lossy());
            let size = entry.size();
            let end = entry.raw_file_position() + size.div_ceil(512) * 512;
            if let Some(dir) = name
                .strip_suffix("/.wh..wh..opq")
                .or((name == ".wh..wh..opq").then_some(""))
            {
                opaque_dirs.insert(dir.to_string());
            }
            let link = (kind == tar::EntryType::Link)
                .then(|| {
                    entry
                        .link_name()
                        .ok()
                        .flatten()
                        .map(|l| clean(&l.to_string_lossy()))
                })
                .flatten();
            records.push(Record {
                name,
                link,
                start: prev_end,
                end,
            });
            prev_end = end;
        }
        trailer_start = prev_end;
    }
    let by_name: HashMap<&str, usize> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (r.name.as_str(), i))
        .collect();
    let under_opaque = |name: &str| {
        let mut dir = name;
        while let Some((parent, _)) = dir.rsplit_once('/') {
            if opaque_dirs.contains(parent) {
                return true;
            }
            dir = parent;
        }
        opaque_dirs.contains("")
    };
    let mut first: Vec<usize> = Vec::new();
    let mut moved: HashSet<usize> = HashSet::new();
    if !global {
        for path in order {
            let Some(&i) = by_name.get(clean(path).as_str()) else {
                continue;
            };
            if moved.contains(&i) || under_opaque(&records[i].name) {
                continue;
            }
            if let Some(target) = records[i].link.as_deref().and_then(|t| by_name.get(t)) {
                if !moved.contains(target) && !under_opaque(&records[*target].name) {
                    moved.insert(*target);
                    first.push(*target);
                } else if !moved.contains(target) {
                    continue;
                }
            }
            moved.insert(i);
            first.push(i);
        }
    }
    let sequence: Vec<usize> = first
        .iter()
        .copied()
        .chain((0..records.len()).filter(|i| !moved.contains(i)))
        .collect();
    let total = input
        .seek(SeekFrom::End(0))
        .map_err(io("seek the layer tar"))?;
    let mut copy = |start: u64, end: u64| -> Result<(), ChunkedError> {
        input
            .seek(SeekFrom::Start(start))
            .map_err(io("seek the layer tar"))?;
        let copied = std::io::copy(&mut (&mut input).take(end - start), output)
            .map_err(io("copy the layer tar"))?;
        if copied != end - start {
            return Err(ChunkedError::Format("the layer tar is truncated".into()));
        }
        Ok(())
    };
    for i in sequence {
        copy(records[i].start, records[i].end)?;
    }
    copy(trailer_start, total)?;
    Ok(Moved {
        entries: first.len(),
        bytes: first
            .iter()
            .map(|i| records[*i].end - records[*i].start)
            .sum(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn names(tar: &[u8]) -> Vec<String> {
        tar::Archive::new(tar)
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn listed_files_move_first_with_their_link_targets() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        for name in ["a", "b", "c", &format!("long/{}", "x".repeat(120))] {
            h.set_size(3);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h.clone(), name, &b"abc"[..]).unwrap();
        }
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Link);
        l.set_size(0);
        b.append_link(&mut l, "d", "b").unwrap();
        h.set_size(0);
        b.append_data(&mut h.clone(), "o/.wh..wh..opq", &[][..])
            .unwrap();
        h.set_size(1);
        b.append_data(&mut h.clone(), "o/f", &b"z"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let long = format!("long/{}", "x".repeat(120));
        let mut out = Vec::new();
        let order = vec![
            "/c".to_string(),
            long.clone(),
            "d".into(),
            "o/f".into(),
            "missing".into(),
        ];
        let moved = reorder(Cursor::new(&tar), &mut out, &order).unwrap();
        assert_eq!(moved.entries, 4);
        assert_eq!(
            names(&out),
            vec![
                "c".to_string(),
                long,
                "b".into(),
                "d".into(),
                "a".into(),
                "o/.wh..wh..opq".into(),
                "o/f".into()
            ]
        );
        assert_eq!(out.len(), tar.len());
        // Nothing listed: the same bytes.
        let mut same = Vec::new();
        let none = reorder(Cursor::new(&tar), &mut same, &[]).unwrap();
        assert_eq!((none.entries, none.bytes), (0, 0));
        assert_eq!(same, tar);
    }
}
