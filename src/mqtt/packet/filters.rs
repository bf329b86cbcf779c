//! The topic filters of a SUBSCRIBE or UNSUBSCRIBE: a caller's list to
//! emit, or the validated bytes of a parsed packet, read lazily.

use super::*;

/// Topic filters of a SUBSCRIBE or UNSUBSCRIBE: a caller's list to emit, or
/// the validated bytes of a parsed packet.
#[derive(Clone, Copy)]
pub enum Filters<'a> {
    /// Filters to emit; for UNSUBSCRIBE the QoS is ignored.
    List(&'a [(&'a str, QoS)]),
    /// Filters of a parsed packet, decoded lazily by `iter()`.
    Encoded(EncodedFilters<'a>),
}

/// The filter list of a parsed packet; only `parse` makes one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodedFilters<'a> {
    bytes: &'a [u8],
    /// SUBSCRIBE carries a QoS byte after each filter, UNSUBSCRIBE does not.
    with_qos: bool,
}

impl<'a> Filters<'a> {
    /// Each filter with its QoS (QoS 0 for a parsed UNSUBSCRIBE).
    pub fn iter(&self) -> FilterIter<'a> {
        FilterIter(match *self {
            Filters::List(list) => FilterIterInner::List(list.iter()),
            Filters::Encoded(e) => FilterIterInner::Encoded(Reader::new(e.bytes), e.with_qos),
        })
    }

    /// The number of filters.
    pub fn len(&self) -> usize {
        match self {
            Filters::List(list) => list.len(),
            Filters::Encoded(_) => self.iter().count(),
        }
    }

    /// Whether there are no filters (never true for a parsed packet).
    pub fn is_empty(&self) -> bool {
        match self {
            Filters::List(list) => list.is_empty(),
            Filters::Encoded(e) => e.bytes.is_empty(),
        }
    }
}

impl fmt::Debug for Filters<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Equal when the same filters with the same QoS come in the same order,
/// whether listed or encoded.
impl PartialEq for Filters<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Filters<'_> {}

/// Iterator over topic filters.
#[derive(Clone, Debug)]
pub struct FilterIter<'a>(FilterIterInner<'a>);

#[derive(Clone, Debug)]
enum FilterIterInner<'a> {
    List(core::slice::Iter<'a, (&'a str, QoS)>),
    Encoded(Reader<'a>, bool),
}

impl<'a> Iterator for FilterIter<'a> {
    type Item = (&'a str, QoS);

    fn next(&mut self) -> Option<(&'a str, QoS)> {
        match &mut self.0 {
            FilterIterInner::List(it) => it.next().copied(),
            FilterIterInner::Encoded(r, with_qos) => {
                if r.is_empty() {
                    return None;
                }
                // `parse` validated these bytes with the same function, so
                // this never fails; if it did, the iteration would just end.
                let item = read_filter(r, *with_qos).ok();
                if item.is_none() {
                    r.rest();
                }
                item
            }
        }
    }
}

/// Reads one filter (and its QoS byte for SUBSCRIBE) [3.8.3], [3.10.3].
fn read_filter<'a>(r: &mut Reader<'a>, with_qos: bool) -> Result<(&'a str, QoS), Error> {
    let filter = r.string()?;
    topic::check_filter(filter)?;
    let qos = if with_qos {
        // Bits 7-2 are reserved [MQTT-3.8.3-4]; QoS 2 is not supported.
        QoS::from_u8(r.u8()?).ok_or(Error::InvalidQoS)?
    } else {
        QoS::AtMostOnce
    };
    Ok((filter, qos))
}

/// Validates the rest of `r` as a non-empty filter list and takes it.
pub(super) fn parse_filters<'a>(
    r: &mut Reader<'a>,
    with_qos: bool,
    empty: &'static str,
) -> Result<Filters<'a>, Error> {
    let bytes = r.rest();
    if bytes.is_empty() {
        return Err(Error::Protocol(empty)); // [MQTT-3.8.3-3], [MQTT-3.10.3-2]
    }
    let mut check = Reader::new(bytes);
    while !check.is_empty() {
        read_filter(&mut check, with_qos)?;
    }
    Ok(Filters::Encoded(EncodedFilters { bytes, with_qos }))
}
