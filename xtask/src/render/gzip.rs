//! gzip at Go's `gzip.BestCompression` framing (mtime 0, XFL 2, OS 255), as Butane compresses.
//!
//! The header and trailer are byte-identical to Go's `compress/gzip`; the deflate stream comes
//! from flate2 (miniz_oxide) at level 9, which decompresses to the same bytes but is not always
//! the same bit stream as Go's `compress/flate`.

use std::io::Write as _;

/// Compresses `data` into a gzip member.
pub fn compress(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), flate2::Compression::best());
    enc.write_all(data).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}

/// Decompresses a gzip member.
#[cfg(test)]
pub fn decompress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(data), &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn header_matches_go_best_compression_and_round_trips() {
        let gz = super::compress(b"hello hello hello hello\n");
        assert_eq!(&gz[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 255]);
        assert_eq!(super::decompress(&gz).unwrap(), b"hello hello hello hello\n");
    }
}
