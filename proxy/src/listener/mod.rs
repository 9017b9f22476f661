//! Listeners: the LDS socket listeners and in-process internal listeners ([`manager`]), what a
//! connection carries ([`conn`]), the listener filters that sniff ([`inspect`]), filter chain
//! selection ([`chain`]).

pub mod chain;
pub mod conn;
pub mod inspect;
pub mod manager;
