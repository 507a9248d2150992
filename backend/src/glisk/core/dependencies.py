"""FastAPI dependencies. Handlers declare ``uow: UowDep`` and get a request-scoped unit of work
that commits when the handler returns and rolls back if it raises."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from glisk.uow import UnitOfWork, UnitOfWorkFactory


def get_uow_factory(request: Request) -> UnitOfWorkFactory:
    return request.app.state.uow_factory


def get_session_factory(request: Request) -> async_sessionmaker[AsyncSession]:
    return request.app.state.session_factory


async def get_uow(
    uow_factory: Annotated[UnitOfWorkFactory, Depends(get_uow_factory)],
) -> AsyncIterator[UnitOfWork]:
    async with uow_factory() as uow:
        yield uow


# scope="function": the commit happens before the response is sent, so a failed commit
# becomes an error response instead of a 200 for work that was lost.
UowDep = Annotated[UnitOfWork, Depends(get_uow, scope="function")]
SessionFactoryDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_session_factory)]
