//! The cascade over the Open Inference Protocol: an LLM's OIP text requests
//! (`llm::oip`) go through the cascade like OpenAI's. The request
//! parameter `x-ferrite-escalate` forces a side; every reply carries the
//! route as string parameters (`x-ferrite-served-by`, ...). An escalated
//! request goes to the target as an OpenAI `/completions` request.

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::{self, StreamExt};

use crate::backend::{Backend, BackendInfo};
use crate::cascade::{Cascade, Escalate, Forward, Route, TextRequest, ESCALATE};
use crate::error::{InferError, InferResult};
use crate::inference::{InferRequest, ParamValue, Reply, ReplyStream};
use crate::llm::oip::{self, final_reply, replies};
use crate::llm::Generation;

/// The side a request's parameter forces (a string: `always` or `never`).
fn forced(request: &InferRequest) -> InferResult<Option<Escalate>> {
    match request.parameters.get(ESCALATE) {
        None => Ok(None),
        Some(ParamValue::Str(value)) => Escalate::parse(Some(value)),
        Some(_) => Err(InferError::invalid(format!("parameter '{ESCALATE}' must be the string 'always' or 'never'"))),
    }
}

/// Adds the route to a reply's parameters.
fn with_route(mut reply: Reply, route: &Route) -> Reply {
    for (name, value) in route.fields() {
        reply.parameters.insert(name.to_string(), ParamValue::Str(value));
    }
    reply
}

impl Cascade {
    /// Decodes an OIP request and answers it through the cascade (one choice).
    async fn start_oip(
        &self,
        request: &InferRequest,
        streaming: bool,
    ) -> InferResult<(oip::TextRequest, Generation, Route)> {
        let escalate = forced(request)?;
        let mut decoded = oip::decode(request)?;
        let text = std::mem::take(&mut decoded.prompt);
        let prompt = self.llm().text_prompt(text.clone()).await?;
        let request = TextRequest {
            prompt,
            options: decoded.options.clone(),
            n: 1,
            stream: streaming && decoded.stream != Some(false),
            forward: Forward::Oip { prompt: text },
            escalate,
        };
        let (mut generations, route) = self.generate(request).await?;
        let generation = generations.pop().ok_or_else(|| InferError::internal("the cascade answered no choice"))?;
        Ok((decoded, generation, route))
    }
}

impl Backend for Cascade {
    fn info(&self) -> &BackendInfo {
        Backend::info(&**self.llm())
    }

    /// ModelInfer: the whole answer in one reply, with the route.
    fn infer(&self, request: InferRequest) -> BoxFuture<'_, InferResult<Reply>> {
        Box::pin(async move {
            let (_, generation, route) = self.start_oip(&request, false).await?;
            Ok(with_route(final_reply(generation.collect().await?, None), &route))
        })
    }

    /// ModelStreamInfer: as the LLM streams, each reply with the route.
    fn infer_stream(self: Arc<Self>, request: InferRequest) -> InferResult<ReplyStream> {
        let started = async move { self.start_oip(&request, true).await };
        Ok(stream::once(started)
            .flat_map(|started| match started {
                Ok((decoded, generation, route)) => {
                    replies(decoded, generation).map(move |reply| reply.map(|r| with_route(r, &route))).boxed()
                }
                Err(error) => stream::once(futures::future::ready(Err(error))).boxed(),
            })
            .boxed())
    }

    fn close(&self) {
        self.llm().close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parameter_is_a_string_naming_a_side() {
        let mut request = InferRequest::default();
        assert_eq!(forced(&request), Ok(None));
        request.parameters.insert(ESCALATE.into(), ParamValue::Str("always".into()));
        assert_eq!(forced(&request), Ok(Some(Escalate::Always)));
        request.parameters.insert(ESCALATE.into(), ParamValue::Str("maybe".into()));
        assert!(forced(&request).unwrap_err().message.contains(ESCALATE));
        request.parameters.insert(ESCALATE.into(), ParamValue::Bool(true));
        assert!(forced(&request).unwrap_err().message.contains("must be the string"));
    }
}
