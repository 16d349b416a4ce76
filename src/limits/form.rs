//! The `model` field of a `multipart/form-data` request body (audio transcriptions and
//! translations, image edits and variations send their file and their model this way), for
//! the model allow-lists and model policies. The part headers are parsed by httparse
//! (hyper's own header parser).

/// The value of the one `model` field of a multipart body; `None` when the body is not
/// multipart/form-data with exactly one `model` field of UTF-8 text, or holds a part the
/// upstream might read as the model differently (a `Model` field, two `Content-Disposition`
/// headers in one part).
pub fn model(content_type: Option<&[u8]>, body: &[u8]) -> Option<String> {
    let boundary = boundary(content_type?)?;
    let mut delimiter = Vec::with_capacity(boundary.len() + 4);
    delimiter.extend_from_slice(b"\r\n--");
    delimiter.extend_from_slice(boundary);
    // The first delimiter may start the body, without the line break before it.
    let body_start = body.strip_prefix(&delimiter[2..])?;
    let finder = memchr::memmem::Finder::new(&delimiter);
    let mut found = None;
    let mut rest = body_start;
    loop {
        // After a delimiter: `--` ends the body, a line break starts a part.
        if rest.starts_with(b"--") {
            return found;
        }
        rest = rest.strip_prefix(b"\r\n")?;
        let end = finder.find(rest)?;
        let part = &rest[..end];
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let httparse::Status::Complete((head_len, headers)) =
            httparse::parse_headers(part, &mut headers).ok()?
        else {
            return None;
        };
        let mut dispositions = headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("content-disposition"));
        let disposition = match (dispositions.next(), dispositions.next()) {
            (Some(d), None) => Some(d.value),
            (None, _) => None,
            (Some(_), Some(_)) => return None,
        };
        let name = disposition.and_then(field_name);
        let is_model = name == Some(&b"model"[..]);
        if !is_model && name.is_some_and(|n| n.eq_ignore_ascii_case(b"model")) {
            return None;
        }
        if is_model {
            // A file, or a value some parsers decode (base64, quoted-printable), is not
            // the text the check would compare.
            let file = disposition.is_some_and(|d| {
                d.split(|&b| b == b';')
                    .filter_map(split_param)
                    .any(|(k, _)| {
                        k.eq_ignore_ascii_case(b"filename") || k.eq_ignore_ascii_case(b"filename*")
                    })
            });
            let encoded = headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("content-transfer-encoding"));
            if file || encoded {
                return None;
            }
            if found.is_some() {
                return None;
            }
            found = Some(String::from_utf8(part[head_len..].to_vec()).ok()?);
        }
        rest = &rest[end + delimiter.len()..];
    }
}

/// Whether a content type is `multipart/form-data` (with or without parameters).
pub fn is_multipart(content_type: Option<&[u8]>) -> bool {
    content_type.is_some_and(|ct| {
        let media = ct.split(|&b| b == b';').next().unwrap_or_default();
        media
            .trim_ascii()
            .eq_ignore_ascii_case(b"multipart/form-data")
    })
}

/// `boundary` of a `multipart/form-data` content type (media types are case-insensitive).
fn boundary(content_type: &[u8]) -> Option<&[u8]> {
    let mut params = content_type.split(|&b| b == b';');
    let media = params.next()?.trim_ascii();
    if !media.eq_ignore_ascii_case(b"multipart/form-data") {
        return None;
    }
    params.find_map(|p| {
        let (k, v) = split_param(p)?;
        k.eq_ignore_ascii_case(b"boundary")
            .then_some(v)
            .filter(|v| !v.is_empty() && v.len() <= 70)
    })
}

/// `name` of `form-data; name="model"`.
fn field_name(disposition: &[u8]) -> Option<&[u8]> {
    let mut params = disposition.split(|&b| b == b';');
    if !params
        .next()?
        .trim_ascii()
        .eq_ignore_ascii_case(b"form-data")
    {
        return None;
    }
    params.find_map(|p| {
        let (k, v) = split_param(p)?;
        k.eq_ignore_ascii_case(b"name").then_some(v)
    })
}

fn split_param(p: &[u8]) -> Option<(&[u8], &[u8])> {
    let eq = p.iter().position(|&b| b == b'=')?;
    let (k, v) = (p[..eq].trim_ascii(), p[eq + 1..].trim_ascii());
    let v = v
        .strip_prefix(b"\"")
        .and_then(|v| v.strip_suffix(b"\""))
        .unwrap_or(v);
    Some((k, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: &[u8] = b"multipart/form-data; boundary=XyZ";

    fn form(parts: &[(&str, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (name, value) in parts {
            b.extend_from_slice(
                format!(
                    "--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                )
                .as_bytes(),
            );
        }
        b.extend_from_slice(b"--XyZ--\r\n");
        b
    }

    #[test]
    fn reads_the_model_field() {
        let body = form(&[
            ("file", "RIFF....WAVE"),
            ("model", "whisper-1"),
            ("language", "en"),
        ]);
        assert_eq!(model(Some(CT), &body).as_deref(), Some("whisper-1"));
        assert_eq!(
            model(Some(b"Multipart/Form-Data; boundary=\"XyZ\""), &body).as_deref(),
            Some("whisper-1")
        );
        assert_eq!(model(Some(CT), &form(&[("file", "x")])), None);
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let two = form(&[("model", "whisper-1"), ("model", "gpt-4o-transcribe")]);
        assert_eq!(model(Some(CT), &two), None, "two models: which one?");
        assert_eq!(
            model(Some(b"application/json"), &form(&[("model", "m")])),
            None
        );
        assert_eq!(model(None, &form(&[("model", "m")])), None);
        assert_eq!(
            model(
                Some(CT),
                b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm"
            ),
            None
        );
        assert_eq!(model(Some(CT), b"garbage"), None);
        let cased = form(&[("model", "whisper-1"), ("MODEL", "gpt-4o-transcribe")]);
        assert_eq!(
            model(Some(CT), &cased),
            None,
            "a field the upstream may fold"
        );
        assert_eq!(model(Some(CT), &form(&[("Model", "m")])), None);
        let twice = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--XyZ--\r\n";
        assert_eq!(model(Some(CT), twice), None, "which disposition counts?");
        let file = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.txt\"\r\n\r\nm\r\n--XyZ--\r\n";
        assert_eq!(model(Some(CT), file), None, "a file is not a field");
        let encoded = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\nContent-Transfer-Encoding: base64\r\n\r\nZ3B0LTRv\r\n--XyZ--\r\n";
        assert_eq!(model(Some(CT), encoded), None, "decoded by some parsers");
    }
}
