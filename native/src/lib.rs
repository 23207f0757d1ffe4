//! Prototype: streamproc's generated plan function (streamproc/pipeline/codegen.py) as a
//! compiled interpreter.
//!
//! Why: the plan function is the largest piece of `Pipeline.process` (about half of its
//! per-record time), and most of that is CPython bytecode walking the Avro binary of kept
//! fields.  This crate walks the same binary in Rust and copies kept runs with `memcpy`;
//! operators stay the Python callables the plan builder bound (one implementation of each
//! operator, the one the reference interpreter and the known-answer tests check), called
//! back with the decoded value.
//!
//! The walk reproduces the generated Python code statement for statement, including its
//! lax corners (slices past the end clamp, `pos += 4` past the end is only caught by the
//! final length check), so that for every input it returns the same bytes or fails with
//! the same class of error at the same point: the codegen property tests run both and
//! compare.  A spec this interpreter does not know (recursive schemas, subject-keyed
//! operators) is refused at construction, and the caller keeps the Python function.

use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyByteArray, PyBytes, PyFloat, PyList, PyString, PyTuple};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::HashSet;

mod risk;

/// A value to skip (what the generated `skip()` emits).
enum Ty {
    Null,
    Bool,
    Long,
    Float,
    Double,
    Fixed(u64),
    Enum(u64),
    Str,
    Record(Vec<Ty>),
    /// items, count-guard width (`_min_width(items) + is_map`), is_map
    Array(Box<Ty>, i128, bool),
    Union(Vec<Ty>),
}

impl Ty {
    /// Skipping it reads nothing (null, or records of nulls): the generated code emits no
    /// loop for such items, so neither does this (a huge count must not spin).
    fn zero_width(&self) -> bool {
        match self {
            Ty::Null => true,
            Ty::Record(fields) => fields.iter().all(Ty::zero_width),
            _ => false,
        }
    }
}

/// How an operator's input is decoded (`decode()` of the generated code).
enum Dec {
    Str,
    Bytes,
    Long,
    Enum(i64),
    Float,
    Double,
    Bool,
    Fixed(u64),
    Null,
}

/// An operator computed here instead of calling back into Python.  Only an exact bound
/// function that carries a ``native_op`` attribute is replaced (streamproc/crypto/pseudonym.py,
/// operators/mask.py, operators/generalize.py, operators/base.py:fail_closed); any other
/// variant has no such attribute and is called as usual.  Every one takes a string and
/// returns a string.
enum NatOp {
    /// ``"tk<v>_" + base64url(HMAC-SHA256(key, utf8)[:16])`` without padding (22 chars).
    Token { prefix: Vec<u8>, mac: Hmac<Sha256> },
    /// ``mask`` without ``preserve`` or ``fixed_length``: keep_first / keep_last code points,
    /// the rest replaced; everything replaced when that would show more than half.
    Mask { first: usize, last: usize, ch: String },
    /// ``generalize: {cidr: N}`` on a canonical dotted quad (what both Python fast paths
    /// handle, with the same text); anything else declines and the Python function runs.
    Ipv4Cidr { bits: u32 },
    /// ``fail_closed`` around a text operator: an output containing (``contains``) or equal
    /// to its input is replaced by ``suppressed``, or refused (``quarantine``: Ineffective).
    Guard { inner: Box<NatOp>, contains: bool, suppressed: String, quarantine: bool },
}

/// What a native operator made of one value.
enum NatOut {
    Text(Vec<u8>),
    /// Not handled here: call the Python function with the value.
    Decline,
    /// ``Ineffective``: the guard refused the output.
    Ineffective,
}

impl NatOp {
    fn eval(&self, v: &str) -> NatOut {
        match self {
            NatOp::Token { prefix, mac } => {
                let mut m = mac.clone();
                m.update(v.as_bytes());
                let digest = m.finalize().into_bytes();
                let mut w = Vec::with_capacity(prefix.len() + 22);
                w.extend_from_slice(prefix);
                b64url16(&digest[..16], &mut w);
                NatOut::Text(w)
            }
            NatOp::Mask { first, last, ch } => {
                let n = v.chars().count();
                if first.saturating_add(*last).saturating_mul(2) > n {
                    return NatOut::Text(ch.repeat(n).into_bytes());
                }
                let head_end = v.char_indices().nth(*first).map_or(v.len(), |(i, _)| i);
                let tail_start = if *last == 0 {
                    v.len()
                } else {
                    v.char_indices().nth(n - last).map_or(v.len(), |(i, _)| i)
                };
                let mut w = Vec::with_capacity(v.len() + 8);
                w.extend_from_slice(&v.as_bytes()[..head_end]);
                w.extend_from_slice(ch.repeat(n - first - last).as_bytes());
                w.extend_from_slice(&v.as_bytes()[tail_start..]);
                NatOut::Text(w)
            }
            NatOp::Ipv4Cidr { bits } => match canonical_quad(v) {
                None => NatOut::Decline,
                Some(a) => {
                    let m: u32 = if *bits == 0 { 0 } else { u32::MAX << (32 - bits) };
                    let a = a & m;
                    NatOut::Text(
                        format!("{}.{}.{}.{}/{}", a >> 24, (a >> 16) & 255, (a >> 8) & 255, a & 255, bits)
                            .into_bytes(),
                    )
                }
            },
            NatOp::Guard { inner, contains, suppressed, quarantine } => match inner.eval(v) {
                NatOut::Text(out) => {
                    let hit = if *contains { find(&out, v.as_bytes()) } else { out == v.as_bytes() };
                    if !hit {
                        NatOut::Text(out)
                    } else if *quarantine {
                        NatOut::Ineffective
                    } else {
                        NatOut::Text(suppressed.clone().into_bytes())
                    }
                }
                other => other,
            },
        }
    }
}

/// ``needle in haystack`` for valid UTF-8 (a byte match is a code-point match).
fn find(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// Four 1-3 digit ASCII decimals <= 255 without leading zeros, dot-separated.
fn canonical_quad(v: &str) -> Option<u32> {
    let mut a: u32 = 0;
    let mut parts = 0;
    for p in v.split('.') {
        parts += 1;
        let b = p.as_bytes();
        if parts > 4 || b.is_empty() || b.len() > 3 || !b.iter().all(u8::is_ascii_digit) || (b[0] == b'0' && b.len() > 1) {
            return None;
        }
        let x: u32 = p.parse().ok()?;
        if x > 255 {
            return None;
        }
        a = (a << 8) | x;
    }
    if parts == 4 {
        Some(a)
    } else {
        None
    }
}

struct Apply {
    /// `None`: the operator does not read its input (skip it, pass `None`).
    dec: Option<Dec>,
    skip: Ty,
    func: PyObject,
    /// `None`: string output, encoded inline (`fn(v).encode()` + length prefix).
    enc: Option<PyObject>,
    path: PyObject,
    nat: Option<NatOp>,
}

enum Node {
    Keep(Ty),
    Drop(Ty),
    Apply(Box<Apply>),
    Record(Vec<Node>),
    /// items, count-guard width
    Array(Box<Node>, i128),
    /// transformed keys (None: copied), values, count-guard width
    Map(Option<Box<Apply>>, Box<Node>, i128),
    /// re-encoded branch indexes (None: identity), branches
    Union(Option<Vec<Vec<u8>>>, Vec<Node>),
}

fn bad_spec(what: &str) -> PyErr {
    PyValueError::new_err(format!("native plan: bad spec ({what})"))
}

fn parse_ty(spec: &Bound<'_, PyAny>) -> PyResult<Ty> {
    let t: &Bound<'_, PyTuple> = spec.downcast()?;
    let kind: String = t.get_item(0)?.extract()?;
    Ok(match kind.as_str() {
        "null" => Ty::Null,
        "boolean" => Ty::Bool,
        "long" => Ty::Long,
        "float" => Ty::Float,
        "double" => Ty::Double,
        "fixed" => Ty::Fixed(t.get_item(1)?.extract()?),
        "enum" => Ty::Enum(t.get_item(1)?.extract()?),
        "string" => Ty::Str,
        "record" => {
            let items: Vec<Bound<'_, PyAny>> = t.get_item(1)?.extract()?;
            Ty::Record(items.iter().map(parse_ty).collect::<PyResult<_>>()?)
        }
        "array" | "map" => Ty::Array(
            Box::new(parse_ty(&t.get_item(1)?)?),
            t.get_item(2)?.extract()?,
            kind == "map",
        ),
        "union" => {
            let items: Vec<Bound<'_, PyAny>> = t.get_item(1)?.extract()?;
            Ty::Union(items.iter().map(parse_ty).collect::<PyResult<_>>()?)
        }
        _ => return Err(bad_spec("type")),
    })
}

fn parse_dec(spec: &Bound<'_, PyAny>) -> PyResult<Option<Dec>> {
    if spec.is_none() {
        return Ok(None);
    }
    let t: &Bound<'_, PyTuple> = spec.downcast()?;
    let kind: String = t.get_item(0)?.extract()?;
    Ok(Some(match kind.as_str() {
        "string" => Dec::Str,
        "bytes" => Dec::Bytes,
        "long" => Dec::Long,
        "enum" => Dec::Enum(t.get_item(1)?.extract()?),
        "float" => Dec::Float,
        "double" => Dec::Double,
        "boolean" => Dec::Bool,
        "fixed" => Dec::Fixed(t.get_item(1)?.extract()?),
        "null" => Dec::Null,
        _ => return Err(bad_spec("decoder")),
    }))
}

fn parse_nat(spec: &Bound<'_, PyAny>) -> PyResult<Option<NatOp>> {
    if spec.is_none() {
        return Ok(None);
    }
    let t: &Bound<'_, PyTuple> = spec.downcast()?;
    let kind: String = t.get_item(0)?.extract()?;
    Ok(Some(match kind.as_str() {
        "token" => {
            let prefix: String = t.get_item(1)?.extract()?;
            let key: Vec<u8> = t.get_item(2)?.extract()?;
            let mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).map_err(|_| bad_spec("token key"))?;
            NatOp::Token { prefix: prefix.into_bytes(), mac }
        }
        "mask" => NatOp::Mask {
            first: t.get_item(1)?.extract()?,
            last: t.get_item(2)?.extract()?,
            ch: t.get_item(3)?.extract()?,
        },
        "ipv4_cidr" => {
            let bits: u32 = t.get_item(1)?.extract()?;
            if bits > 32 {
                return Err(bad_spec("cidr"));
            }
            NatOp::Ipv4Cidr { bits }
        }
        "guard" => NatOp::Guard {
            inner: Box::new(parse_nat(&t.get_item(1)?)?.ok_or_else(|| bad_spec("guard"))?),
            contains: t.get_item(2)?.extract()?,
            suppressed: t.get_item(3)?.extract()?,
            quarantine: t.get_item(4)?.extract()?,
        },
        _ => return Err(bad_spec("native op")),
    }))
}

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// base64url of 16 bytes without padding: 22 characters.
fn b64url16(d: &[u8], out: &mut Vec<u8>) {
    for c in d[..15].chunks(3) {
        let n = ((c[0] as u32) << 16) | ((c[1] as u32) << 8) | c[2] as u32;
        out.extend_from_slice(&[
            B64URL[(n >> 18) as usize & 63],
            B64URL[(n >> 12) as usize & 63],
            B64URL[(n >> 6) as usize & 63],
            B64URL[n as usize & 63],
        ]);
    }
    let last = d[15] as u32;
    out.push(B64URL[(last >> 2) as usize]);
    out.push(B64URL[((last & 3) << 4) as usize]);
}

fn parse_apply(t: &Bound<'_, PyTuple>) -> PyResult<Apply> {
    // ("apply", dec | None, skip type, fn, enc | None, path, native op | None)
    let enc = t.get_item(4)?;
    let nat = parse_nat(&t.get_item(6)?)?;
    if nat.is_some() && !(matches!(parse_dec(&t.get_item(1)?)?, Some(Dec::Str)) && enc.is_none()) {
        return Err(bad_spec("native op needs a string in and out"));
    }
    Ok(Apply {
        nat,
        dec: parse_dec(&t.get_item(1)?)?,
        skip: parse_ty(&t.get_item(2)?)?,
        func: t.get_item(3)?.unbind(),
        enc: if enc.is_none() { None } else { Some(enc.unbind()) },
        path: t.get_item(5)?.unbind(),
    })
}

fn parse_node(spec: &Bound<'_, PyAny>) -> PyResult<Node> {
    let t: &Bound<'_, PyTuple> = spec.downcast()?;
    let kind: String = t.get_item(0)?.extract()?;
    Ok(match kind.as_str() {
        "keep" => Node::Keep(parse_ty(&t.get_item(1)?)?),
        "drop" => Node::Drop(parse_ty(&t.get_item(1)?)?),
        "apply" => Node::Apply(Box::new(parse_apply(t)?)),
        "record" => {
            let items: Vec<Bound<'_, PyAny>> = t.get_item(1)?.extract()?;
            Node::Record(items.iter().map(parse_node).collect::<PyResult<_>>()?)
        }
        "array" => Node::Array(Box::new(parse_node(&t.get_item(1)?)?), t.get_item(2)?.extract()?),
        "map" => {
            let keys = t.get_item(1)?;
            let keys = if keys.is_none() {
                None
            } else {
                Some(Box::new(parse_apply(keys.downcast()?)?))
            };
            Node::Map(keys, Box::new(parse_node(&t.get_item(2)?)?), t.get_item(3)?.extract()?)
        }
        "union" => {
            let remap = t.get_item(1)?;
            let remap = if remap.is_none() {
                None
            } else {
                let idx: Vec<i128> = remap.extract()?;
                Some(idx.into_iter().map(enc_long).collect())
            };
            let items: Vec<Bound<'_, PyAny>> = t.get_item(2)?.extract()?;
            Node::Union(remap, items.iter().map(parse_node).collect::<PyResult<_>>()?)
        }
        _ => return Err(bad_spec("node")),
    })
}

/// Avro zigzag varint of `n` (codegen's `enc_long`, on Python's unbounded ints: a block
/// count of 2**63 encodes as ten bytes there, and here).
fn enc_long(n: i128) -> Vec<u8> {
    let mut z = ((n << 1) ^ (n >> 63)) as u128;
    let mut out = Vec::with_capacity(10);
    while z >= 0x80 {
        out.push((z as u8 & 0x7F) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
    out
}

fn push_len(out: &mut Vec<u8>, n: usize) {
    if n < 64 {
        out.push((n as u8) << 1);
    } else {
        out.extend_from_slice(&enc_long(n as i128));
    }
}

/// Errors of the walk: malformed input, or an operator failure already turned into the
/// exception to raise.
enum Fail {
    Bad(&'static str),
    Py(PyErr),
}

type R<T> = Result<T, Fail>;

#[pyclass(frozen, module = "streamproc._native")]
struct NativePlan {
    root: Node,
    offset: usize,
    prefix: Vec<u8>,
    bad: PyObject,
    tf: PyObject,
    tfi: PyObject,
    ineffective: PyObject,
    /// `codegen.PASS_THROUGH` (a tuple of exception classes), as the plan builder passes it:
    /// what an operator may raise that is not a failure of the record.
    passthrough: PyObject,
}

struct Walk<'a, 'py> {
    py: Python<'py>,
    plan: &'a NativePlan,
    buf: &'a [u8],
    /// May run past the end, as in the generated code; saturating, so it never wraps.
    pos: usize,
    start: usize,
    out: Vec<u8>,
}

impl<'a, 'py> Walk<'a, 'py> {
    #[inline(always)]
    fn byte(&self, at: usize) -> R<u8> {
        self.buf.get(at).copied().ok_or(Fail::Bad("index"))
    }

    /// `buf[a:b]` with Python's clamping.
    #[inline(always)]
    fn slice(&self, a: usize, b: usize) -> &'a [u8] {
        let len = self.buf.len();
        let (a, b) = (a.min(len), b.min(len));
        if a >= b {
            &[]
        } else {
            &self.buf[a..b]
        }
    }

    #[inline(always)]
    fn flush(&mut self) {
        let s = self.slice(self.start, self.pos);
        self.out.extend_from_slice(s);
    }

    #[inline(always)]
    fn adv(&mut self, n: u64) {
        self.pos = self.pos.saturating_add(n.min(usize::MAX as u64) as usize);
    }

    /// codegen `_rlong`: at most ten bytes, and within 64 bits.
    fn rlong(&mut self) -> R<i128> {
        let mut b = self.byte(self.pos)?;
        self.pos += 1;
        let mut n: u128 = (b & 0x7F) as u128;
        let mut shift = 7u32;
        while b & 0x80 != 0 {
            b = self.byte(self.pos)?;
            self.pos += 1;
            n |= ((b & 0x7F) as u128) << shift;
            shift += 7;
            if shift > 70 {
                return Err(Fail::Bad("varint too long"));
            }
        }
        if n >> 64 != 0 {
            return Err(Fail::Bad("varint out of range"));
        }
        Ok(((n >> 1) as i128) ^ -((n & 1) as i128))
    }

    fn rlen(&mut self) -> R<u64> {
        let n = self.rlong()?;
        if n < 0 {
            return Err(Fail::Bad("negative length"));
        }
        Ok(n as u64)
    }

    /// A one-byte count inline, else `_rlong` (codegen `block_count`).
    #[inline(always)]
    fn small_long(&mut self) -> R<i128> {
        let b = self.byte(self.pos)?;
        if b & 128 != 0 {
            self.rlong()
        } else {
            self.pos += 1;
            Ok(((b >> 1) as i128) ^ -((b & 1) as i128))
        }
    }

    fn guard(&self, c: i128, width: i128) -> R<()> {
        let room = self.buf.len() as i128 - self.pos.min(i64::MAX as usize) as i128;
        if width >= 1 && c.saturating_mul(width) > room {
            return Err(Fail::Bad("block count"));
        }
        Ok(())
    }

    fn skip(&mut self, t: &Ty) -> R<()> {
        match t {
            Ty::Null => {}
            Ty::Bool => {
                if self.byte(self.pos)? > 1 {
                    return Err(Fail::Bad("boolean"));
                }
                self.pos += 1;
            }
            Ty::Enum(n) => {
                if *n <= 64 {
                    let b = self.byte(self.pos)?;
                    if b as u64 >= 2 * n || b & 1 != 0 {
                        return Err(Fail::Bad("enum index"));
                    }
                    self.pos += 1;
                } else {
                    let e = self.rlong()?;
                    if !(0 <= e && e < *n as i128) {
                        return Err(Fail::Bad("enum index"));
                    }
                }
            }
            Ty::Long => {
                while self.byte(self.pos)? & 128 != 0 {
                    self.pos += 1;
                }
                self.pos += 1;
            }
            Ty::Float => self.adv(4),
            Ty::Double => self.adv(8),
            Ty::Fixed(n) => self.adv(*n),
            Ty::Str => {
                let b = self.byte(self.pos)?;
                if b & 129 != 0 {
                    let n = self.rlen()?;
                    self.adv(n);
                } else {
                    self.pos += 1 + (b >> 1) as usize;
                }
            }
            Ty::Record(fields) => {
                for f in fields {
                    self.skip(f)?;
                }
            }
            Ty::Array(inner, width, is_map) => loop {
                let mut c = self.small_long()?;
                if c == 0 {
                    break;
                }
                let mut end: Option<usize> = None;
                if c < 0 {
                    c = -c;
                    let sz = self.rlen()?;
                    end = Some(self.pos.saturating_add(sz.min(usize::MAX as u64) as usize));
                }
                self.guard(c, *width)?;
                let empty = !*is_map && inner.zero_width();
                if !empty {
                    let mut k: i128 = 0;
                    while k < c {
                        if *is_map {
                            self.skip(&Ty::Str)?;
                        }
                        self.skip(inner)?;
                        k += 1;
                    }
                }
                if let Some(e) = end {
                    if self.pos != e {
                        return Err(Fail::Bad("block size"));
                    }
                }
            },
            Ty::Union(branches) => {
                let i = self.byte(self.pos)?;
                self.pos += 1;
                match branches.get((i >> 1) as usize) {
                    Some(br) if i & 1 == 0 => self.skip(br)?,
                    _ => return Err(Fail::Bad("union branch")),
                }
            }
        }
        Ok(())
    }

    fn read_len(&mut self) -> R<u64> {
        let b = self.byte(self.pos)?;
        if b & 129 != 0 {
            self.rlen()
        } else {
            self.pos += 1;
            Ok((b >> 1) as u64)
        }
    }

    /// Decode one scalar into a Python value (codegen `decode`).
    fn decode(&mut self, d: &Dec) -> R<Bound<'py, PyAny>> {
        let py = self.py;
        Ok(match d {
            Dec::Str | Dec::Bytes => {
                let n = self.read_len()?;
                let end = self.pos.saturating_add(n.min(usize::MAX as u64) as usize);
                let raw = self.slice(self.pos, end);
                self.pos = end;
                if matches!(d, Dec::Str) {
                    let s = std::str::from_utf8(raw).map_err(|_| Fail::Bad("utf-8"))?;
                    PyString::new(py, s).into_any()
                } else {
                    PyBytes::new(py, raw).into_any()
                }
            }
            Dec::Long | Dec::Enum(_) => {
                let v = self.small_long()?;
                if let Dec::Enum(n) = d {
                    if !(0 <= v && v < *n as i128) {
                        return Err(Fail::Bad("enum index"));
                    }
                }
                match (v as i64).into_pyobject(py) {
                    Ok(o) => o.into_any(),
                    Err(e) => match e {},
                }
            }
            Dec::Float => {
                let raw = self.slice(self.pos, self.pos.saturating_add(4));
                let a: [u8; 4] = raw.try_into().map_err(|_| Fail::Bad("float"))?;
                self.pos += 4;
                PyFloat::new(py, f32::from_le_bytes(a) as f64).into_any()
            }
            Dec::Double => {
                let raw = self.slice(self.pos, self.pos.saturating_add(8));
                let a: [u8; 8] = raw.try_into().map_err(|_| Fail::Bad("double"))?;
                self.pos += 8;
                PyFloat::new(py, f64::from_le_bytes(a)).into_any()
            }
            Dec::Bool => {
                let b = self.byte(self.pos)?;
                if b > 1 {
                    return Err(Fail::Bad("boolean"));
                }
                self.pos += 1;
                PyBool::new(py, b == 1).to_owned().into_any()
            }
            Dec::Fixed(n) => {
                let end = self.pos.saturating_add(*n as usize);
                let raw = self.slice(self.pos, end);
                self.pos = end;
                PyBytes::new(py, raw).into_any()
            }
            Dec::Null => py.None().into_bound(py),
        })
    }

    /// An operator's exception as the generated code raises it: one of `PASS_THROUGH`
    /// (`except _Pass: raise`: a forgotten subject, a transient outage) propagates
    /// unchanged, `Ineffective` -> `_TFI(path)`, any other `Exception` -> `_TF(path)`;
    /// anything else (KeyboardInterrupt) propagates unchanged.  The pass-through set is the
    /// one the plan was built with, never a copy here: both paths re-raise the same classes.
    fn op_error(&self, err: PyErr, path: &PyObject) -> Fail {
        let py = self.py;
        if err.is_instance(py, self.plan.passthrough.bind(py)) {
            return Fail::Py(err);
        }
        let which = if err.is_instance(py, self.plan.ineffective.bind(py)) {
            &self.plan.tfi
        } else if err.is_instance_of::<PyException>(py) {
            &self.plan.tf
        } else {
            return Fail::Py(err);
        };
        match which.bind(py).call1((path.bind(py),)) {
            Ok(exc) => Fail::Py(PyErr::from_value(exc)),
            Err(e) => Fail::Py(e),
        }
    }

    /// Run one operator on the value at `pos`; returns its encoded output.
    fn apply_value(&mut self, a: &Apply) -> R<Vec<u8>> {
        if let Some(nat) = &a.nat {
            // decode() of a string; the Python str is built only if the operator declines
            let n = self.read_len()?;
            let end = self.pos.saturating_add(n.min(usize::MAX as u64) as usize);
            let raw = self.slice(self.pos, end);
            self.pos = end;
            let s = std::str::from_utf8(raw).map_err(|_| Fail::Bad("utf-8"))?;
            match nat.eval(s) {
                NatOut::Text(out) => {
                    let mut w = Vec::with_capacity(out.len() + 2);
                    push_len(&mut w, out.len());
                    w.extend_from_slice(&out);
                    return Ok(w);
                }
                NatOut::Ineffective => {
                    let py = self.py;
                    return Err(match self.plan.tfi.bind(py).call1((a.path.bind(py),)) {
                        Ok(exc) => Fail::Py(PyErr::from_value(exc)),
                        Err(e) => Fail::Py(e),
                    });
                }
                NatOut::Decline => {
                    let v = PyString::new(self.py, s).into_any();
                    return self.call_op(a, v);
                }
            }
        }
        let v = match &a.dec {
            Some(d) => self.decode(d)?,
            None => {
                self.skip(&a.skip)?;
                self.py.None().into_bound(self.py)
            }
        };
        self.call_op(a, v)
    }

    /// The Python operator on a decoded value, its result encoded.
    fn call_op(&mut self, a: &Apply, v: Bound<'py, PyAny>) -> R<Vec<u8>> {
        let r = a.func.bind(self.py).call1((v,)).map_err(|e| self.op_error(e, &a.path))?;
        match &a.enc {
            None => {
                let s = r
                    .downcast::<PyString>()
                    .map_err(|e| self.op_error(PyErr::from(e), &a.path))?;
                let s = s.to_str().map_err(|e| self.op_error(e, &a.path))?;
                let mut w = Vec::with_capacity(s.len() + 2);
                push_len(&mut w, s.len());
                w.extend_from_slice(s.as_bytes());
                Ok(w)
            }
            Some(enc) => {
                let w = enc.bind(self.py).call1((r,)).map_err(|e| self.op_error(e, &a.path))?;
                let w = w
                    .downcast::<PyBytes>()
                    .map_err(|e| self.op_error(PyErr::from(e), &a.path))?;
                Ok(w.as_bytes().to_vec())
            }
        }
    }

    fn node(&mut self, n: &Node) -> R<()> {
        match n {
            Node::Keep(t) => self.skip(t)?,
            Node::Drop(t) => {
                self.flush();
                self.skip(t)?;
                self.start = self.pos;
            }
            Node::Apply(a) => {
                self.flush();
                let w = self.apply_value(a)?;
                self.out.extend_from_slice(&w);
                self.start = self.pos;
            }
            Node::Record(children) => {
                for c in children {
                    self.node(c)?;
                }
            }
            Node::Array(inner, width) => self.block(None, inner, *width, false)?,
            Node::Map(keys, values, width) => self.block(keys.as_deref(), values, *width, true)?,
            Node::Union(remap, branches) => {
                if remap.is_some() {
                    self.flush();
                }
                let i = self.byte(self.pos)?;
                self.pos += 1;
                if remap.is_some() {
                    self.start = self.pos;
                }
                match branches.get((i >> 1) as usize) {
                    Some(br) if i & 1 == 0 => {
                        if let Some(m) = remap {
                            self.out.extend_from_slice(&m[(i >> 1) as usize]);
                        }
                        self.node(br)?;
                    }
                    _ => return Err(Fail::Bad("union branch")),
                }
            }
        }
        Ok(())
    }

    /// An array or map node: blocks re-counted, items walked (codegen `node`, Array/Map).
    fn block(&mut self, keys: Option<&Apply>, inner: &Node, width: i128, is_map: bool) -> R<()> {
        self.flush();
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        loop {
            let mut c = self.small_long()?;
            if c == 0 {
                break;
            }
            if c < 0 {
                c = -c;
                self.rlen()?;
            }
            self.guard(c, width)?;
            self.out.extend_from_slice(&enc_long(c));
            self.start = self.pos;
            let noop = !is_map && matches!(inner, Node::Keep(t) if t.zero_width());
            let mut k: i128 = if noop { c } else { 0 };
            while k < c {
                if is_map {
                    match keys {
                        None => self.skip(&Ty::Str)?,
                        Some(a) => {
                            self.flush();
                            let w = self.apply_value(a)?;
                            // w is length prefix + key bytes; distinct keys stay distinct.
                            if !seen.insert(w.clone()) {
                                let py = self.py;
                                return Err(match self.plan.tf.bind(py).call1((a.path.bind(py),)) {
                                    Ok(exc) => Fail::Py(PyErr::from_value(exc)),
                                    Err(e) => Fail::Py(e),
                                });
                            }
                            self.out.extend_from_slice(&w);
                            self.start = self.pos;
                        }
                    }
                }
                self.node(inner)?;
                k += 1;
            }
            self.flush();
        }
        self.out.push(0);
        self.start = self.pos;
        Ok(())
    }
}

impl NativePlan {
    fn fail(&self, py: Python<'_>, f: Fail) -> PyErr {
        match f {
            Fail::Py(e) => e,
            Fail::Bad(what) => match self.bad.bind(py).call1((what,)) {
                Ok(exc) => PyErr::from_value(exc),
                Err(e) => e,
            },
        }
    }

    fn run_bytes(&self, py: Python<'_>, buf: &[u8]) -> PyResult<Vec<u8>> {
        let mut w = Walk {
            py,
            plan: self,
            buf,
            pos: self.offset,
            start: self.offset,
            out: Vec::with_capacity(buf.len() + 64),
        };
        w.out.extend_from_slice(&self.prefix);
        let r = w.node(&self.root).and_then(|_| {
            if w.pos != buf.len() {
                Err(Fail::Bad("trailing or missing bytes"))
            } else {
                w.flush();
                Ok(())
            }
        });
        match r {
            Ok(()) => Ok(w.out),
            Err(f) => Err(self.fail(py, f)),
        }
    }
}

#[pymethods]
impl NativePlan {
    /// `NativePlan(spec, offset, prefix, BadPayload, TF, TFI, Ineffective, PASS_THROUGH)`;
    /// the spec is the tuple tree `streamproc.pipeline.native.plan_spec` builds from a plan.
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        spec: &Bound<'_, PyAny>,
        offset: usize,
        prefix: Vec<u8>,
        bad: PyObject,
        tf: PyObject,
        tfi: PyObject,
        ineffective: PyObject,
        passthrough: PyObject,
    ) -> PyResult<Self> {
        Ok(NativePlan { root: parse_node(spec)?, offset, prefix, bad, tf, tfi, ineffective, passthrough })
    }

    /// The generated function's contract: ``f(buf) -> list[bytes]`` (one part here).
    fn __call__<'py>(&self, py: Python<'py>, buf: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
        let out = self.run_any(py, buf)?;
        PyList::new(py, [out])
    }

    /// The joined output directly.
    fn run<'py>(&self, py: Python<'py>, buf: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
        self.run_any(py, buf)
    }
}

impl NativePlan {
    /// bytes without a copy; a bytearray is copied first (an operator callback could
    /// resize it under the walk), as the generated code would see a snapshot of it.
    fn run_any<'py>(&self, py: Python<'py>, buf: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
        let out = if let Ok(b) = buf.downcast::<PyBytes>() {
            self.run_bytes(py, b.as_bytes())?
        } else if let Ok(b) = buf.downcast::<PyByteArray>() {
            let copy = b.to_vec();
            self.run_bytes(py, &copy)?
        } else {
            return Err(pyo3::exceptions::PyTypeError::new_err("plan input must be bytes"));
        };
        Ok(PyBytes::new(py, &out))
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativePlan>()?;
    m.add_class::<risk::RiskCounts>()?;
    m.add_class::<risk::KeyReader>()?;
    Ok(())
}
