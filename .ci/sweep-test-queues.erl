%% Deletes the queues and exchanges that tests of earlier runs left on the
%% shared RabbitMQ node (a test that panics skips its clean-up). Thousands of
%% leaked quorum queues make the node take many minutes to boot, which once
%% hung CI at rabbitmqctl await_startup. Only the test prefixes match.
%% .ci/run passes this text to rabbitmqctl eval, whose wrapper script hands
%% its arguments to a shell again: keep quotes, backticks and dollars out.
Prefixes = [<<"fp-test-">>, <<"fp-bus-test-">>],
Leaked = fun(Name) -> lists:any(fun(P) -> binary:longest_common_prefix([Name, P]) =:= byte_size(P) end, Prefixes) end,
Qs = [Q || Q <- rabbit_amqqueue:list(), Leaked(element(4, amqqueue:get_name(Q)))],
[rabbit_amqqueue:delete(Q, false, false, <<"fleetpatch-ci">>) || Q <- Qs],
Xs = [element(2, X) || X <- rabbit_exchange:list(), Leaked(element(4, element(2, X)))],
[rabbit_exchange:delete(XN, false, <<"fleetpatch-ci">>) || XN <- Xs],
{length(Qs), length(Xs)}.
