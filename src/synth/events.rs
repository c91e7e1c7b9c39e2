//! Turning compact generated records into domain [`Event`]s, shared by the history and the live
//! stream so both emit exactly the same shapes.

use crate::domain::event::{
    CustomerId, Engagement, EngagementAction, Event, EventBody, MessageChannel, Order,
    OrderChannel, OrderLine, Return, SupportContact,
};
use crate::domain::time::EventTime;
use compact_str::CompactString;

use super::behaviour::{LineRec, REASONS};
use super::catalogue::Catalogue;
use super::persona::TOPICS;

/// Order channels by the index personas weight them with.
pub(crate) const ORDER_CHANNELS: [OrderChannel; 4] = [
    OrderChannel::Web,
    OrderChannel::App,
    OrderChannel::Store,
    OrderChannel::Phone,
];
/// Their names as written to CSV.
pub(crate) const ORDER_CHANNEL_NAMES: [&str; 4] = ["web", "app", "store", "phone"];
/// Message channel names as written to CSV, by `MessageChannel::index`.
pub(crate) const MESSAGE_CHANNEL_NAMES: [&str; 4] = ["email", "sms", "push", "in_app"];
/// Engagement actions by the code records store.
pub(crate) const ACTIONS: [EngagementAction; 4] = [
    EngagementAction::Open,
    EngagementAction::Click,
    EngagementAction::Unsubscribe,
    EngagementAction::Subscribe,
];
/// Their names as written to CSV.
pub(crate) const ACTION_NAMES: [&str; 4] = ["open", "click", "unsubscribe", "subscribe"];
/// Action codes.
pub(crate) const OPEN: u8 = 0;
pub(crate) const CLICK: u8 = 1;
pub(crate) const UNSUBSCRIBE: u8 = 2;
pub(crate) const SUBSCRIBE: u8 = 3;

/// Kinds of record, in the order ties at the same second are broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum Kind {
    Order = 0,
    Return = 1,
    Support = 2,
    Engagement = 3,
}

impl Kind {
    /// Prefix of the event ids of this kind.
    pub(crate) fn prefix(self) -> &'static str {
        match self {
            Self::Order => "o",
            Self::Return => "r",
            Self::Support => "s",
            Self::Engagement => "e",
        }
    }
}

/// Id of the `number`th (1-based) history event of a kind, e.g. `o-00000042`.
pub(crate) fn history_id(kind: Kind, number: u32) -> String {
    format!("{}-{number:08}", kind.prefix())
}

/// Money in cents as the domain's floating-point amount.
pub(crate) fn money(cents: u64) -> f64 {
    cents as f64 / 100.0
}

/// An order event; the order id is the event id.
pub(crate) fn order(
    id: String,
    customer: CustomerId,
    time: EventTime,
    channel: u8,
    lines: &[LineRec],
    catalogue: &Catalogue,
) -> Event {
    let lines = lines
        .iter()
        .map(|l| {
            let product = &catalogue.products[l.product as usize];
            OrderLine {
                product_id: Some(CompactString::from(&*product.id)),
                category: Some(CompactString::from(
                    &*catalogue.categories[usize::from(product.category)].name,
                )),
                quantity: f64::from(l.quantity),
                unit_price: money(u64::from(l.unit_cents)),
                list_price: Some(money(u64::from(product.list_cents))),
            }
        })
        .collect();
    Event {
        event_id: id.clone(),
        customer_id: customer,
        event_time: time,
        body: EventBody::Order(Order {
            order_id: Some(id),
            channel: Some(ORDER_CHANNELS[usize::from(channel) % 4]),
            lines,
        }),
    }
}

/// A return event for an earlier order.
pub(crate) fn refund(
    id: String,
    customer: CustomerId,
    time: EventTime,
    order_id: String,
    amount_cents: u64,
    reason: u8,
) -> Event {
    Event {
        event_id: id,
        customer_id: customer,
        event_time: time,
        body: EventBody::Return(Return {
            order_id: Some(order_id),
            amount: money(amount_cents),
            reason: Some(REASONS[usize::from(reason) % REASONS.len()].to_owned()),
        }),
    }
}

/// A support contact event.
pub(crate) fn support(
    id: String,
    customer: CustomerId,
    time: EventTime,
    topic: u8,
    complexity: u8,
) -> Event {
    Event {
        event_id: id,
        customer_id: customer,
        event_time: time,
        body: EventBody::SupportContact(SupportContact {
            topic: TOPICS[usize::from(topic) % TOPICS.len()].to_owned(),
            complexity: f64::from(complexity.clamp(1, 5)),
        }),
    }
}

/// A messaging interaction event.
pub(crate) fn engagement(
    id: String,
    customer: CustomerId,
    time: EventTime,
    channel: u8,
    action: u8,
) -> Event {
    Event {
        event_id: id,
        customer_id: customer,
        event_time: time,
        body: EventBody::Engagement(Engagement {
            channel: MessageChannel::ALL[usize::from(channel) % 4],
            action: ACTIONS[usize::from(action) % 4],
        }),
    }
}

/// Customer id of the customer with the given 0-based number: `C0000001` for the first.
pub(crate) fn customer_label(number: usize) -> String {
    format!("C{:07}", number + 1)
}

/// The 0-based customer number behind a label made by [`customer_label`], if it is one.
pub(crate) fn customer_number(id: &CustomerId) -> Option<usize> {
    let digits = id.as_str().strip_prefix('C')?;
    let n: usize = digits.parse().ok()?;
    let number = n.checked_sub(1)?;
    (customer_label(number) == id.as_str()).then_some(number)
}
