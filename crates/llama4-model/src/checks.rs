//! Preconditions of generation that would otherwise fail silently: logits that hold NaN or
//! infinities (broken weights), a prompt plus new tokens past the context limit (checked
//! without overflow), chat special tokens the tokenizer lacks, image placeholders with no
//! image.

use crate::multimodal::ImageTokenIds;
use crate::tokenizer::{chat_prompt, Tokenizer};
use crate::{Error, Result};

/// The special tokens [`chat_prompt`] writes; [`encode_chat`] needs each as one special token.
pub const CHAT_TOKENS: [&str; 4] = [
    "<|begin_of_text|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eot|>",
];

/// Refuses a logits row holding NaN or an infinity (one pass). A model's logits are finite
/// unless its weights or scales hold NaN/Inf or its activations overflowed; sampling from such
/// a row would pick an arbitrary token.
///
/// # Errors
/// [`Error::NonFiniteLogits`] naming the first such token id and its value.
pub fn check_logits_finite(logits: &[f32]) -> Result<()> {
    match logits.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Error::NonFiniteLogits {
            id: i as u32,
            value: logits[i],
        }),
        None => Ok(()),
    }
}

/// What [`crate::Sampler::sample`] accepts: no NaN, no `+inf`, and not every value `-inf`
/// (a `-inf` logit masks its token).
pub(crate) fn check_sampleable(logits: &[f32]) -> Result<()> {
    let mut any_finite = false;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() || v == f32::INFINITY {
            return Err(Error::NonFiniteLogits {
                id: i as u32,
                value: v,
            });
        }
        any_finite |= v.is_finite();
    }
    if !any_finite {
        return Err(Error::NonFiniteLogits {
            id: 0,
            value: f32::NEG_INFINITY,
        });
    }
    Ok(())
}

/// Checks that a session holding `held` positions can take a `prompt`-token prompt and
/// generate `max_new_tokens` within `limit` positions (the last generated token is not run
/// through the model, so it needs no position). No arithmetic here can overflow.
///
/// # Errors
/// [`Error::ContextOverflow`] when the prompt alone does not fit, [`Error::MaxNewTokens`]
/// (which says how many new tokens fit) when the new tokens are what overflows.
pub fn check_room(held: usize, prompt: usize, max_new_tokens: usize, limit: usize) -> Result<()> {
    let tokens = held.checked_add(prompt).ok_or(Error::ContextOverflow {
        tokens: usize::MAX,
        limit,
    })?;
    if tokens > limit {
        return Err(Error::ContextOverflow { tokens, limit });
    }
    let fits = tokens
        .checked_add(max_new_tokens.saturating_sub(1))
        .is_some_and(|total| total <= limit);
    if !fits {
        return Err(Error::MaxNewTokens {
            prompt: tokens,
            max_new_tokens,
            limit,
            most: limit - tokens + 1,
        });
    }
    Ok(())
}

/// Ids of the Llama 4 chat format around `user` ([`chat_prompt`]), after checking that the
/// tokenizer has every special token the format writes, each as one token: a tokenizer
/// without them would split `<|header_start|>` into ordinary pieces and the model would see
/// no chat format at all.
///
/// # Errors
/// [`Error::MissingChatToken`] naming the first token the tokenizer lacks (or splits).
pub fn encode_chat(tokenizer: &Tokenizer, user: &str) -> Result<Vec<u32>> {
    check_chat_tokens(tokenizer)?;
    tokenizer.encode_with(&chat_prompt(user), false)
}

/// Checks that `tokenizer` has every special token of the Llama 4 chat format
/// ([`CHAT_TOKENS`]) as one whole token, before a rendered chat is encoded with it.
///
/// # Errors
/// [`Error::MissingChatToken`] naming the first token the tokenizer lacks (or splits).
pub fn check_chat_tokens(tokenizer: &Tokenizer) -> Result<()> {
    for token in CHAT_TOKENS {
        let id = tokenizer.token_id(token);
        let whole = match id {
            Some(id) => tokenizer.encode_with(token, false)? == [id],
            None => false,
        };
        if !whole {
            return Err(Error::MissingChatToken { token });
        }
    }
    Ok(())
}

/// Refuses image tokens in a prompt that is run without images: an `<|image|>` placeholder
/// would otherwise be embedded as an ordinary token and the model would answer about an
/// image it never saw.
///
/// # Errors
/// [`Error::ImageCount`] (`images: 0`) for `<|image|>` placeholders, [`Error::ImageFeatureCount`]
/// (`features: 0`) for `<|patch|>` tokens.
pub fn check_text_only_prompt(prompt: &[u32], ids: &ImageTokenIds) -> Result<()> {
    let placeholders = prompt.iter().filter(|&&t| t == ids.image).count();
    if placeholders > 0 {
        return Err(Error::ImageCount {
            placeholders,
            images: 0,
        });
    }
    let patch_tokens = prompt.iter().filter(|&&t| t == ids.patch).count();
    if patch_tokens > 0 {
        return Err(Error::ImageFeatureCount {
            patch_tokens,
            features: 0,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logits_checks() {
        check_logits_finite(&[0.0, -1e30, 3.0]).unwrap();
        for (row, bad) in [
            (vec![0.0, f32::NAN], 1),
            (vec![f32::INFINITY, 0.0], 0),
            (vec![0.0, 1.0, f32::NEG_INFINITY], 2),
        ] {
            match check_logits_finite(&row) {
                Err(Error::NonFiniteLogits { id, .. }) => assert_eq!(id, bad),
                other => panic!("{other:?}"),
            }
        }
        // The sampler takes -inf as a mask, but not a row of nothing else.
        check_sampleable(&[f32::NEG_INFINITY, 1.0]).unwrap();
        assert!(matches!(
            check_sampleable(&[f32::NEG_INFINITY; 3]),
            Err(Error::NonFiniteLogits { .. })
        ));
        assert!(matches!(
            check_sampleable(&[0.0, f32::INFINITY]),
            Err(Error::NonFiniteLogits { id: 1, .. })
        ));
    }

    #[test]
    fn room_is_checked_without_overflow() {
        check_room(0, 10, 7, 16).unwrap();
        check_room(0, 16, 1, 16).unwrap();
        check_room(0, 16, 0, 16).unwrap();
        assert!(matches!(
            check_room(5, 12, 1, 16),
            Err(Error::ContextOverflow {
                tokens: 17,
                limit: 16
            })
        ));
        assert!(matches!(
            check_room(usize::MAX, 1, 1, 16),
            Err(Error::ContextOverflow { .. })
        ));
        for max_new in [8, usize::MAX] {
            match check_room(0, 10, max_new, 16) {
                Err(Error::MaxNewTokens {
                    prompt: 10,
                    max_new_tokens,
                    limit: 16,
                    most: 7,
                }) => assert_eq!(max_new_tokens, max_new),
                other => panic!("{other:?}"),
            }
        }
    }
}
