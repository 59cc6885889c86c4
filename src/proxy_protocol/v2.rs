//! PROXY protocol version 2, the binary format (spec section 2.2).
//!
//! Checks run in wire order as soon as the bytes they need have arrived — signature,
//! version, command, family/transport, length, then each TLV — so a bogus header is
//! rejected early and the same input always fails with the same error however it is
//! split. Only the CRC32C needs the complete header.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::{ready, Limits, Step};
use super::crc32c::{crc32c, Crc32c};
use super::error::{EncodeError, ProxyProtocolError};
use super::header::{Addresses, Command, ProxyHeader, Transport, Version, UNIX_ADDR_LEN};
use super::tlv::{put_tlv, validate, Tlv, PP2_TYPE_CRC32C};

/// The 12 bytes every v2 header starts with. They contain a NUL and the text "QUIT", so
/// they can appear neither in a v1 header nor at the start of a sane HTTP, SMTP or FTP
/// stream (spec section 2.2).
pub(crate) const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Signature, version/command, family/transport and the 16-bit length.
const FIXED_LEN: usize = 16;

const VERSION: u8 = 0x2;
const CMD_LOCAL: u8 = 0x0;
const CMD_PROXY: u8 = 0x1;

const AF_UNSPEC: u8 = 0x0;
const AF_INET: u8 = 0x1;
const AF_INET6: u8 = 0x2;
const AF_UNIX: u8 = 0x3;

/// The family/transport bytes the spec defines. It explicitly requires receivers to
/// reject every other value, including combinations such as INET with UNSPEC transport.
const DEFINED_FAMILY_TRANSPORT: [u8; 7] = [0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32];

const INET_BLOCK: usize = 4 + 4 + 2 + 2;
const INET6_BLOCK: usize = 16 + 16 + 2 + 2;
const UNIX_BLOCK: usize = UNIX_ADDR_LEN * 2;

fn address_block_len(family: u8) -> usize {
    match family {
        AF_INET => INET_BLOCK,
        AF_INET6 => INET6_BLOCK,
        AF_UNIX => UNIX_BLOCK,
        _ => 0,
    }
}

/// The validated fixed part of a header (bytes 13 to 16).
struct Fixed {
    command: Command,
    /// Address family nibble, `AF_*`.
    family: u8,
    transport: Transport,
    len: u16,
}

/// Decodes a v2 header at the start of `buf`; `Ok(None)` if `buf` is a strict prefix of one.
pub(crate) fn decode(buf: &[u8], limits: &Limits) -> Step<(ProxyHeader, usize)> {
    let Fixed {
        command,
        family,
        transport,
        len,
    } = ready!(decode_fixed(buf, limits));
    let total = FIXED_LEN + usize::from(len);
    let block = address_block_len(family);
    let tlv_start = if usize::from(len) >= block {
        FIXED_LEN + block
    } else if command == Command::Local {
        // Receivers must accept LOCAL whatever it carries and skip `len` bytes; a block
        // too short for its own family holds nothing we could interpret, TLVs included.
        total
    } else {
        return Err(ProxyProtocolError::AddressBlockTooShort {
            family,
            len,
            // At most 216, the AF_UNIX block.
            required: u16::try_from(block).unwrap_or(u16::MAX),
        });
    };

    // First pass over the bytes received so far: framing and values, without allocating,
    // so that feeding a header byte by byte stays cheap.
    let mut crc_range = None;
    ready!(walk_tlvs(buf, tlv_start, total, |kind, range, value| {
        validate(kind, value)
            .map_err(|reason| ProxyProtocolError::TlvMalformed { kind, reason })?;
        if kind == PP2_TYPE_CRC32C {
            if crc_range.is_some() {
                // Each checksum would have to be computed with the others zeroed, which
                // the spec does not define.
                return Err(ProxyProtocolError::TlvMalformed {
                    kind,
                    reason: "more than one CRC32C TLV",
                });
            }
            crc_range = Some(range);
        }
        Ok(())
    }));

    let Some(raw) = buf.get(..total) else {
        return Ok(None);
    };

    if let Some(range) = crc_range {
        verify_crc(raw, range)?;
    }

    // One copy of the whole header; every TLV value is a view into it.
    let raw = Bytes::copy_from_slice(raw);
    let mut tlvs = Vec::new();
    ready!(walk_tlvs(&raw, tlv_start, total, |kind, range, _| {
        tlvs.push(Tlv::new(kind, raw.slice(range)));
        Ok(())
    }));

    let (transport, addresses) = match command {
        // The spec makes receivers discard the whole protocol block, family included.
        Command::Local => (Transport::Unspec, Addresses::Unspec),
        Command::Proxy => (transport, read_addresses(family, &raw)?),
    };
    let header = ProxyHeader {
        version: Version::V2,
        command,
        transport,
        addresses,
        tlvs,
    };
    Ok(Some((header, total)))
}

/// Checks signature, version, command, family/transport and length, each as soon as
/// its byte has arrived.
fn decode_fixed(buf: &[u8], limits: &Limits) -> Step<Fixed> {
    if buf.iter().zip(&SIGNATURE).any(|(have, want)| have != want) {
        return Err(ProxyProtocolError::NotProxyProtocol);
    }

    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(None);
    };
    if ver_cmd >> 4 != VERSION {
        return Err(ProxyProtocolError::BadVersion(ver_cmd >> 4));
    }
    let command = match ver_cmd & 0x0F {
        CMD_LOCAL => Command::Local,
        CMD_PROXY => Command::Proxy,
        other => return Err(ProxyProtocolError::BadCommand(other)),
    };

    let Some(&fam) = buf.get(13) else {
        return Ok(None);
    };
    let family = fam >> 4;
    if family > AF_UNIX {
        return Err(ProxyProtocolError::BadFamily(family));
    }
    let transport = match fam & 0x0F {
        0x0 => Transport::Unspec,
        0x1 => Transport::Stream,
        0x2 => Transport::Dgram,
        other => return Err(ProxyProtocolError::BadTransport(other)),
    };
    if !DEFINED_FAMILY_TRANSPORT.contains(&fam) {
        return Err(ProxyProtocolError::BadFamilyTransport(fam));
    }

    let Some(&[hi, lo]) = buf.get(14..FIXED_LEN) else {
        return Ok(None);
    };
    let len = u16::from_be_bytes([hi, lo]);
    if usize::from(len) > limits.max_v2_len {
        return Err(ProxyProtocolError::TooLarge {
            len: usize::from(len),
            limit: limits.max_v2_len,
        });
    }
    Ok(Some(Fixed {
        command,
        family,
        transport,
        len,
    }))
}

/// Walks the TLVs in `buf[start..end]` (`end` being where `len` says the header ends),
/// passing each type, value range and value to `visit`. `Ok(None)` if `buf` stops first.
fn walk_tlvs<'a>(
    buf: &'a [u8],
    start: usize,
    end: usize,
    mut visit: impl FnMut(u8, Range<usize>, &'a [u8]) -> Result<(), ProxyProtocolError>,
) -> Step<()> {
    let mut offset = start;
    while offset < end {
        // Overruns are judged against `len`, which is already known, so they are
        // reported before the rest of the header arrives.
        let value_start = offset + 3;
        if value_start > end {
            return Err(ProxyProtocolError::TlvOverrun { offset });
        }
        let Some(&[kind, hi, lo]) = buf.get(offset..value_start) else {
            return Ok(None);
        };
        let value_end = value_start + usize::from(u16::from_be_bytes([hi, lo]));
        if value_end > end {
            return Err(ProxyProtocolError::TlvOverrun { offset });
        }
        let Some(value) = buf.get(value_start..value_end) else {
            return Ok(None);
        };
        visit(kind, value_start..value_end, value)?;
        offset = value_end;
    }
    Ok(Some(()))
}

/// Checks the CRC32C stored at `range` of `raw` against the header with that field
/// zeroed (spec section 2.2.3).
fn verify_crc(raw: &[u8], range: Range<usize>) -> Result<(), ProxyProtocolError> {
    let (Some(before), Some(stored), Some(after)) = (
        raw.get(..range.start),
        raw.get(range.clone())
            .and_then(|v| <[u8; 4]>::try_from(v).ok()),
        raw.get(range.end..),
    ) else {
        // Unreachable: the TLV walk validated a 4-byte value inside `raw`.
        return Err(ProxyProtocolError::TlvMalformed {
            kind: PP2_TYPE_CRC32C,
            reason: "CRC32C value must be exactly 4 bytes",
        });
    };
    let expected = u32::from_be_bytes(stored);
    let actual = Crc32c::new()
        .update(before)
        .update(&[0; 4])
        .update(after)
        .finish();
    if expected == actual {
        Ok(())
    } else {
        Err(ProxyProtocolError::Crc32cMismatch { expected, actual })
    }
}

fn read_addresses(family: u8, raw: &[u8]) -> Result<Addresses, ProxyProtocolError> {
    let block = raw.get(FIXED_LEN..).unwrap_or_default();
    // Unreachable: `decode` checked that `len` covers the family's block.
    parse_address_block(family, block).ok_or(ProxyProtocolError::AddressBlockTooShort {
        family,
        len: 0,
        required: 0,
    })
}

fn parse_address_block(family: u8, block: &[u8]) -> Option<Addresses> {
    let mut block = Reader(block);
    Some(match family {
        AF_INET => {
            let (src, dst) = (block.take::<4>()?, block.take::<4>()?);
            let (sport, dport) = (block.port()?, block.port()?);
            Addresses::Inet {
                src: SocketAddr::from((src, sport)),
                dst: SocketAddr::from((dst, dport)),
            }
        }
        AF_INET6 => {
            let (src, dst) = (block.take::<16>()?, block.take::<16>()?);
            let (sport, dport) = (block.port()?, block.port()?);
            Addresses::Inet {
                src: SocketAddr::from((src, sport)),
                dst: SocketAddr::from((dst, dport)),
            }
        }
        AF_UNIX => Addresses::Unix {
            src: trim_padding(&block.take::<UNIX_ADDR_LEN>()?),
            dst: trim_padding(&block.take::<UNIX_ADDR_LEN>()?),
        },
        _ => Addresses::Unspec,
    })
}

/// Strips the NUL padding after a `sun_path`.
fn trim_padding(path: &[u8]) -> Vec<u8> {
    let len = path
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |last| last + 1);
    path.get(..len).unwrap_or_default().to_vec()
}

/// Reads fixed-size fields off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (field, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*field)
    }

    fn port(&mut self) -> Option<u16> {
        self.take().map(u16::from_be_bytes)
    }
}

/// Encodes a v2 header; with `append_crc`, adds a CRC32C TLV unless one is present.
pub(crate) fn encode(header: &ProxyHeader, append_crc: bool) -> Result<Bytes, EncodeError> {
    debug_assert_eq!(header.version, Version::V2);
    let family = match &header.addresses {
        Addresses::Unspec => AF_UNSPEC,
        Addresses::Inet {
            src: SocketAddr::V4(_),
            dst: SocketAddr::V4(_),
        } => AF_INET,
        Addresses::Inet {
            src: SocketAddr::V6(_),
            dst: SocketAddr::V6(_),
        } => AF_INET6,
        Addresses::Inet { .. } => return Err(EncodeError::MixedAddressFamilies),
        Addresses::Unix { src, dst } => {
            if let Some(path) = [src, dst].into_iter().find(|p| p.len() > UNIX_ADDR_LEN) {
                return Err(EncodeError::UnixPathTooLong { len: path.len() });
            }
            AF_UNIX
        }
    };
    let transport = match header.transport {
        Transport::Unspec => 0x0,
        Transport::Stream => 0x1,
        Transport::Dgram => 0x2,
    };
    let fam = family << 4 | transport;
    if !DEFINED_FAMILY_TRANSPORT.contains(&fam) {
        return Err(EncodeError::BadFamilyTransport(fam));
    }

    let mut crc_tlvs = 0;
    for tlv in &header.tlvs {
        if tlv.kind == PP2_TYPE_CRC32C {
            // Its value is ours to compute; whatever the caller put there is replaced.
            crc_tlvs += 1;
        } else {
            validate(tlv.kind, &tlv.value).map_err(|reason| EncodeError::InvalidTlv {
                kind: tlv.kind,
                reason,
            })?;
        }
    }
    if crc_tlvs > 1 {
        return Err(EncodeError::InvalidTlv {
            kind: PP2_TYPE_CRC32C,
            reason: "more than one CRC32C TLV",
        });
    }
    let append_crc = append_crc && crc_tlvs == 0;

    let tlv_len = |tlv: &Tlv| {
        3 + if tlv.kind == PP2_TYPE_CRC32C {
            4
        } else {
            tlv.value.len()
        }
    };
    let len = address_block_len(family)
        + header.tlvs.iter().map(tlv_len).sum::<usize>()
        + if append_crc { 3 + 4 } else { 0 };
    let len16 = u16::try_from(len).map_err(|_| EncodeError::TooLarge { len })?;

    let mut out = BytesMut::with_capacity(FIXED_LEN + len);
    out.put_slice(&SIGNATURE);
    out.put_u8(
        VERSION << 4
            | match header.command {
                Command::Local => CMD_LOCAL,
                Command::Proxy => CMD_PROXY,
            },
    );
    out.put_u8(fam);
    out.put_u16(len16);
    put_addresses(&mut out, &header.addresses);

    let mut crc_at = None;
    for tlv in &header.tlvs {
        if tlv.kind == PP2_TYPE_CRC32C {
            crc_at = Some(put_crc_placeholder(&mut out));
        } else {
            put_tlv(&mut out, tlv).map_err(|reason| EncodeError::InvalidTlv {
                kind: tlv.kind,
                reason,
            })?;
        }
    }
    if append_crc {
        crc_at = Some(put_crc_placeholder(&mut out));
    }
    if let Some(at) = crc_at {
        let crc = crc32c(&out);
        if let Some(field) = out.get_mut(at..at + 4) {
            field.copy_from_slice(&crc.to_be_bytes());
        }
    }
    debug_assert_eq!(out.len(), FIXED_LEN + len);
    Ok(out.freeze())
}

fn put_addresses(out: &mut BytesMut, addresses: &Addresses) {
    match addresses {
        Addresses::Unspec => {}
        Addresses::Inet { src, dst } => {
            match (src, dst) {
                (SocketAddr::V4(src), SocketAddr::V4(dst)) => {
                    out.put_slice(&src.ip().octets());
                    out.put_slice(&dst.ip().octets());
                }
                (SocketAddr::V6(src), SocketAddr::V6(dst)) => {
                    out.put_slice(&src.ip().octets());
                    out.put_slice(&dst.ip().octets());
                }
                // Rejected by `encode` before anything is written.
                _ => {}
            }
            out.put_u16(src.port());
            out.put_u16(dst.port());
        }
        Addresses::Unix { src, dst } => {
            // Lengths were checked by `encode`.
            for path in [src, dst] {
                out.put_slice(path);
                out.put_bytes(0, UNIX_ADDR_LEN.saturating_sub(path.len()));
            }
        }
    }
}

/// Writes a zeroed CRC32C TLV and returns the offset of its value.
fn put_crc_placeholder(out: &mut BytesMut) -> usize {
    out.put_u8(PP2_TYPE_CRC32C);
    out.put_u16(4);
    let at = out.len();
    out.put_u32(0);
    at
}

#[cfg(test)]
mod tests;
