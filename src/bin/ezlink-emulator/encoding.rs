//! `x-emu-encoding`: gzip, deflate (zlib format) or brotli over any body. Streamed bodies
//! are compressed frame by frame with a sync flush, so each SSE event stays decodable as
//! soon as it arrives.

use std::io::{self, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use flate2::write::{GzEncoder, ZlibEncoder};
use flate2::Compression;
use http_body::{Body as HttpBody, Frame};

use crate::body::{Body, BoxError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    Deflate,
    Brotli,
}

impl Encoding {
    pub fn parse(value: &str) -> Option<Encoding> {
        match value.trim().to_ascii_lowercase().as_str() {
            "gzip" => Some(Encoding::Gzip),
            "deflate" => Some(Encoding::Deflate),
            "br" => Some(Encoding::Brotli),
            _ => None,
        }
    }

    /// The `content-encoding` value.
    pub fn token(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Deflate => "deflate",
            Encoding::Brotli => "br",
        }
    }
}

enum Encoder {
    Gzip(GzEncoder<Vec<u8>>),
    Deflate(ZlibEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
}

impl Encoder {
    fn new(encoding: Encoding) -> Encoder {
        match encoding {
            Encoding::Gzip => Encoder::Gzip(GzEncoder::new(Vec::new(), Compression::fast())),
            Encoding::Deflate => {
                Encoder::Deflate(ZlibEncoder::new(Vec::new(), Compression::fast()))
            }
            Encoding::Brotli => Encoder::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                4,
                22,
            ))),
        }
    }

    /// Compresses `data`, flushes, and returns what the encoder has produced so far.
    fn write(&mut self, data: &[u8], flush: bool) -> io::Result<Bytes> {
        let out = match self {
            Encoder::Gzip(e) => {
                e.write_all(data)?;
                if flush {
                    e.flush()?;
                }
                e.get_mut()
            }
            Encoder::Deflate(e) => {
                e.write_all(data)?;
                if flush {
                    e.flush()?;
                }
                e.get_mut()
            }
            Encoder::Brotli(e) => {
                e.write_all(data)?;
                if flush {
                    e.flush()?;
                }
                e.get_mut()
            }
        };
        Ok(Bytes::from(std::mem::take(out)))
    }

    /// Ends the compressed stream and returns its last bytes.
    fn finish(self) -> io::Result<Bytes> {
        let out = match self {
            Encoder::Gzip(e) => e.finish()?,
            Encoder::Deflate(e) => e.finish()?,
            Encoder::Brotli(e) => e.into_inner(),
        };
        Ok(Bytes::from(out))
    }
}

/// Compresses a complete body.
pub fn compress(encoding: Encoding, data: &[u8]) -> io::Result<Bytes> {
    let mut encoder = Encoder::new(encoding);
    let head = encoder.write(data, false)?;
    let tail = encoder.finish()?;
    if head.is_empty() {
        return Ok(tail);
    }
    let mut all = Vec::with_capacity(head.len() + tail.len());
    all.extend_from_slice(&head);
    all.extend_from_slice(&tail);
    Ok(Bytes::from(all))
}

/// Compresses a streamed body frame by frame.
pub struct Encoded {
    inner: Body,
    encoder: Option<Encoder>,
}

impl Encoded {
    pub fn new(inner: Body, encoding: Encoding) -> Self {
        Encoded {
            inner,
            encoder: Some(Encoder::new(encoding)),
        }
    }
}

impl HttpBody for Encoded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(encoder) = this.encoder.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(err))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let out = encoder.write(&data, true)?;
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Poll::Ready(None) => {
                    let Some(encoder) = this.encoder.take() else {
                        return Poll::Ready(None);
                    };
                    return Poll::Ready(Some(Ok(Frame::data(encoder.finish()?))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.encoder.is_none()
    }
}
