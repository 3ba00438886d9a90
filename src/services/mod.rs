//! What each service does: order-service takes orders over HTTP;
//! payment-service and notification-service are [`crate::consumer`]
//! handlers run by [`crate::consumer::run_until`].

pub mod notification;
pub mod order;
pub mod payment;

pub use crate::ops::{NotReady, ServiceError};
